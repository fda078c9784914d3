//! Many peer entries in few syscalls: the requests of a snapshot's
//! thousands of routes, neighbours and FDB entries go out many to a
//! datagram on a socket of their own, and their acks are read back in
//! bulk. The kernel handles the requests of one datagram in order, each as
//! if sent alone, and acks each by its sequence number. One request at a
//! time through rtnetlink's connection task costs a round trip between
//! threads per entry (docs/performance.md); `ip -batch` one syscall pair.
//! Runs on a blocking thread: nothing here waits for anything but the
//! kernel.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::NeighbourAttribute,
    route::{RouteProtocol, RouteScope},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::attrs::{fdb_message, neighbour_message, route_message};
use crate::peers::Entry;

/// Requests per datagram: ~100 bytes each, and their acks (36 bytes each,
/// capped) well inside the receive buffer.
const PER_DATAGRAM: usize = 256;
/// Receive buffer asked for (the kernel caps it at net.core.rmem_max).
const RX_BUFFER: usize = 1 << 20;
/// errno for a batch that could not be sent or answered at all.
const EIO: i32 = 5;

/// The request that adds (`add`) or removes `entry` on the device `index`:
/// the same messages rtnetlink's requests build.
pub(super) fn request(entry: &Entry, add: bool, index: u32) -> (RouteNetlinkMessage, u16) {
    let flags = if add {
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    } else {
        NLM_F_REQUEST | NLM_F_ACK
    };
    let msg = match (*entry, add) {
        (Entry::Route { block, via }, true) => {
            RouteNetlinkMessage::NewRoute(route_message(block, via, index))
        }
        (Entry::Route { block, via }, false) => {
            // As one by one: protocol 0 and scope "nowhere" are wildcards
            // on delete, so a stray of any protocol goes too.
            let mut m = route_message(block, via, index);
            m.header.protocol = RouteProtocol::Unspec;
            m.header.scope = RouteScope::NoWhere;
            RouteNetlinkMessage::DelRoute(m)
        }
        (Entry::Neighbour { ip, mac }, true) => {
            let mut m = neighbour_message(ip, index);
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
            RouteNetlinkMessage::NewNeighbour(m)
        }
        (Entry::Neighbour { ip, .. }, false) => {
            RouteNetlinkMessage::DelNeighbour(neighbour_message(ip, index))
        }
        (Entry::Fdb { mac, dst }, true) => {
            RouteNetlinkMessage::NewNeighbour(fdb_message(mac, dst, index))
        }
        (Entry::Fdb { mac, dst }, false) => {
            RouteNetlinkMessage::DelNeighbour(fdb_message(mac, dst, index))
        }
    };
    (msg, flags)
}

/// Sends every request and returns each entry's errno (0: done), in order.
pub(super) fn send(entries: &[Entry], add: bool, index: u32) -> Vec<i32> {
    let mut codes = vec![EIO; entries.len()];
    let socket = match open() {
        Ok(s) => s,
        Err(e) => {
            codes.fill(e.raw_os_error().unwrap_or(EIO));
            return codes;
        }
    };
    let mut datagram = Vec::with_capacity(PER_DATAGRAM * 128);
    let mut acks = vec![0u8; 64 * 1024];
    for (chunk_no, chunk) in entries.chunks(PER_DATAGRAM).enumerate() {
        let first = chunk_no * PER_DATAGRAM;
        datagram.clear();
        for (i, entry) in chunk.iter().enumerate() {
            let (payload, flags) = request(entry, add, index);
            let mut header = NetlinkHeader::default();
            header.flags = flags;
            // Sequence numbers from 1: the entry's place in `entries`.
            header.sequence_number = u32::try_from(first + i + 1).unwrap_or(u32::MAX);
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
            msg.finalize();
            let start = datagram.len();
            datagram.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut datagram[start..]);
        }
        if let Err(e) = socket.send(&datagram, 0) {
            let errno = e.raw_os_error().unwrap_or(EIO);
            codes[first..].fill(errno);
            return codes;
        }
        let mut pending = chunk.len();
        while pending > 0 {
            let n = match socket.recv(&mut &mut acks[..], 0) {
                Ok(n) => n,
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(EIO);
                    codes[first..].fill(errno);
                    return codes;
                }
            };
            let mut offset = 0;
            while offset < n {
                let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&acks[offset..n])
                else {
                    break;
                };
                let len = msg.header.length as usize;
                let seq = msg.header.sequence_number as usize;
                if let NetlinkPayload::Error(e) = msg.payload
                    && (first + 1..=first + chunk.len()).contains(&seq)
                {
                    // The kernel reports errors negated.
                    codes[seq - 1] = -e.raw_code();
                    pending -= 1;
                }
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
            }
        }
    }
    codes
}

fn open() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // An ack then carries only the request's header, not the request.
    socket.set_cap_ack(true)?;
    socket.set_rx_buf_sz(RX_BUFFER)?;
    // The kernel answers every request before sendmsg returns; a missing
    // ack must not hang the agent.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .map_err(std::io::Error::from)?;
    Ok(socket)
}
