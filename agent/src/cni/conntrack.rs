//! Flushing released addresses' flows from conntrack over ctnetlink, many
//! addresses per pass. Every dump or filtered flush makes the kernel walk
//! the whole conntrack hash, which is shared by all namespaces and sized by
//! the machine's memory (~10 ms of CPU here even with the namespace empty),
//! and the `conntrack` tool does one walk per address and direction. The
//! flusher takes what is released within a short window and walks once:
//! one dump, then a delete for each entry that names one of the addresses.
//! The message handling is pure and unit tested; the socket work runs on a
//! thread of its own.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::{OnceLock, mpsc},
    time::Duration,
};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::sync::oneshot;
use tracing::{debug, warn};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_{NEW,GET,DELETE}.
const CT_NEW: u16 = 0x100;
const CT_GET: u16 = 0x101;
const CT_DELETE: u16 = 0x102;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const AF_INET: u8 = 2;
const ENOENT: i32 = 2;

/// How long a released address waits for others before the walk.
const WINDOW: Duration = Duration::from_millis(20);

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message: header (native byte order) + nfgenmsg + body.
fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m.extend_from_slice(body);
    m
}

/// The request for every IPv4 entry of this namespace.
pub fn dump_request(seq: u32) -> Vec<u8> {
    message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, &[])
}

/// Netlink attributes of `buf`: (type without flags, payload, the whole
/// attribute with its padding).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let whole = &rest[..align(len).min(rest.len())];
        let payload = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((kind, payload, whole))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf)
        .find(|(k, _, _)| *k == kind)
        .map(|(_, p, _)| p)
}

fn tuple_addresses(tuple: &[u8]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let ip = find(tuple, CTA_TUPLE_IP).unwrap_or(&[]);
    [CTA_IP_V4_SRC, CTA_IP_V4_DST]
        .into_iter()
        .filter_map(move |k| <[u8; 4]>::try_from(find(ip, k)?).ok().map(Ipv4Addr::from))
}

/// The delete request for a dumped entry (its attributes, after nfgenmsg)
/// if either of its tuples names one of `addrs`: the original tuple and
/// the zone identify the entry, copied as the kernel sent them.
pub fn delete_request(seq: u32, entry: &[u8], addrs: &HashSet<Ipv4Addr>) -> Option<Vec<u8>> {
    let mut orig = None;
    let mut zone = None;
    let mut hit = false;
    for (kind, payload, whole) in attributes(entry) {
        match kind {
            CTA_TUPLE_ORIG | CTA_TUPLE_REPLY => {
                hit |= tuple_addresses(payload).any(|a| addrs.contains(&a));
                if kind == CTA_TUPLE_ORIG {
                    orig = Some(whole);
                }
            }
            CTA_ZONE => zone = Some(whole),
            _ => {}
        }
    }
    let orig = orig.filter(|_| hit)?;
    let mut body = orig.to_vec();
    body.extend_from_slice(zone.unwrap_or(&[]));
    Some(message(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, &body))
}

/// What one received buffer holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Attributes of each conntrack entry.
    pub entries: Vec<Vec<u8>>,
    /// The dump (or the request) is over.
    pub done: bool,
    /// The kernel's errno, if it refused (0 is an ACK).
    pub error: Option<i32>,
}

/// Splits a received buffer into its messages.
pub fn parse(buf: &[u8]) -> Received {
    let mut r = Received::default();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        let payload = &rest[16..len];
        match kind {
            NLMSG_DONE => r.done = true,
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(i32::from_ne_bytes)
                    .unwrap_or(0);
                r.error = Some(-code);
                r.done = true;
            }
            CT_NEW if payload.len() >= 4 => r.entries.push(payload[4..].to_vec()),
            _ => {}
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    r
}

/// A ctnetlink socket of the agent's namespace.
struct Ctnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Ctnetlink {
    fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        // A kernel that never answers must not hold released addresses
        // from binds for ever: the batch falls back to the tool instead.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(5, 0),
        )
        .map_err(std::io::Error::from)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(256 * 1024),
        })
    }

    fn recv(&mut self) -> std::io::Result<Received> {
        self.buf.clear();
        self.socket.recv(&mut self.buf, 0)?;
        Ok(parse(&self.buf))
    }

    /// Deletes every entry naming one of `addrs`; how many.
    fn flush(&mut self, addrs: &HashSet<Ipv4Addr>) -> std::io::Result<usize> {
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&dump_request(self.seq), 0)?;
        let mut doomed = Vec::new();
        loop {
            let r = self.recv()?;
            for entry in &r.entries {
                self.seq = self.seq.wrapping_add(1);
                if let Some(req) = delete_request(self.seq, entry, addrs) {
                    doomed.push(req);
                }
            }
            if let Some(e) = r.error.filter(|e| *e != 0) {
                return Err(std::io::Error::from_raw_os_error(e));
            }
            if r.done {
                break;
            }
        }
        let mut deleted = 0;
        for req in doomed {
            self.socket.send(&req, 0)?;
            match self.recv()?.error {
                Some(0) => deleted += 1,
                // Gone meanwhile (it expired, or a reply tuple matched twice).
                Some(ENOENT) | None => {}
                Some(e) => return Err(std::io::Error::from_raw_os_error(e)),
            }
        }
        Ok(deleted)
    }
}

type Job = (Ipv4Addr, oneshot::Sender<()>);

/// Drops the conntrack entries naming `ip`, with the other addresses
/// released meanwhile; returns once they are gone (best-effort: failures
/// are logged).
pub async fn flush(ip: Ipv4Addr) {
    static FLUSHER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    let Some(jobs) = FLUSHER.get_or_init(start) else {
        return;
    };
    let (done, wait) = oneshot::channel();
    if jobs.send((ip, done)).is_ok() {
        let _ = wait.await;
    }
}

/// The flusher's thread, in the namespace of the thread that started it
/// (the agent's: a tokio worker never enters a pod's).
fn start() -> Option<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let started = std::thread::Builder::new()
        .name("weft-conntrack".into())
        .spawn(move || run(&rx));
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            warn!(error = %e, "cannot start the conntrack flusher; flows of released addresses are not flushed");
            None
        }
    }
}

fn run(jobs: &mpsc::Receiver<Job>) {
    let mut ct = match Ctnetlink::open() {
        Ok(ct) => Some(ct),
        Err(e) => {
            warn!(error = %e, "no ctnetlink socket; falling back to the conntrack tool");
            None
        }
    };
    while let Ok(first) = jobs.recv() {
        std::thread::sleep(WINDOW);
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let addrs: HashSet<Ipv4Addr> = batch.iter().map(|(ip, _)| *ip).collect();
        let flushed = ct.as_mut().map(|ct| ct.flush(&addrs));
        match flushed {
            Some(Ok(deleted)) => debug!(addresses = addrs.len(), deleted, "conntrack flushed"),
            Some(Err(e)) => {
                warn!(error = %e, "ctnetlink flush failed; using the conntrack tool");
                addrs.iter().for_each(|ip| flush_with_tool(*ip));
            }
            None => addrs.iter().for_each(|ip| flush_with_tool(*ip)),
        }
        for (_, done) in batch {
            let _ = done.send(());
        }
    }
}

/// The `conntrack` tool, where ctnetlink cannot be used: it exits 1 when
/// nothing matched, and may not be installed.
fn flush_with_tool(ip: Ipv4Addr) {
    for flag in ["-s", "-d"] {
        let ran = std::process::Command::new("conntrack")
            .args(["-D", flag, &ip.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if let Err(e) = ran {
            warn!(%ip, error = %e, "conntrack not available; flows of the released address are not flushed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align(a.len()), 0);
        a
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                // CTA_TUPLE_PROTO { CTA_PROTO_NUM = TCP }
                nested(2, &[attr(1, &[6])]),
            ],
        )
    }

    fn entry(orig: ([u8; 4], [u8; 4]), reply: ([u8; 4], [u8; 4])) -> Vec<u8> {
        [
            tuple(CTA_TUPLE_ORIG, orig.0, orig.1),
            tuple(CTA_TUPLE_REPLY, reply.0, reply.1),
            attr(CTA_ZONE | 0x4000, &7u16.to_be_bytes()),
            attr(3, &[0, 0, 0, 8]), // CTA_STATUS, not copied
        ]
        .concat()
    }

    fn addrs(list: &[[u8; 4]]) -> HashSet<Ipv4Addr> {
        list.iter().map(|a| Ipv4Addr::from(*a)).collect()
    }

    #[test]
    fn an_entry_naming_a_released_address_in_either_tuple_is_deleted_by_its_original_tuple() {
        let pod = [10, 244, 0, 5];
        let (vip, other) = ([10, 96, 0, 10], [10, 244, 1, 9]);
        let released = addrs(&[pod]);
        // The pod's own flow, a flow to it, a Service flow DNATed to it (the
        // pod appears only in the reply tuple), and one that is not its.
        for (orig, reply, hit) in [
            ((pod, other), (other, pod), true),
            ((other, pod), (pod, other), true),
            ((other, vip), (pod, other), true),
            ((other, vip), (other, other), false),
        ] {
            let e = entry(orig, reply);
            let req = delete_request(9, &e, &released);
            assert_eq!(req.is_some(), hit, "{orig:?} {reply:?}");
            let Some(req) = req else { continue };
            assert_eq!(u16::from_ne_bytes([req[4], req[5]]), CT_DELETE);
            assert_eq!(u32::from_ne_bytes([req[8], req[9], req[10], req[11]]), 9);
            let body = &req[20..];
            let want = [
                tuple(CTA_TUPLE_ORIG, orig.0, orig.1),
                attr(CTA_ZONE | 0x4000, &7u16.to_be_bytes()),
            ]
            .concat();
            assert_eq!(body, want.as_slice());
            assert_eq!(
                u32::from_ne_bytes([req[0], req[1], req[2], req[3]]) as usize,
                req.len()
            );
        }
    }

    #[test]
    fn a_received_buffer_splits_into_entries_acks_errors_and_done() {
        let e = entry(
            ([10, 244, 0, 5], [1, 1, 1, 1]),
            ([1, 1, 1, 1], [10, 244, 0, 5]),
        );
        let mut buf = message(CT_NEW, 0x2, 1, &e);
        buf.extend(message(CT_NEW, 0x2, 1, &e));
        buf.extend(message(NLMSG_DONE, 0x2, 1, &[]));
        let r = parse(&buf);
        assert_eq!(r.entries, vec![e.clone(), e]);
        assert!(r.done);
        assert_eq!(r.error, None);

        // NLMSG_ERROR carries -errno then the request's header.
        let mut err = (-ENOENT).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]);
        let mut buf = Vec::new();
        buf.extend_from_slice(&((16 + err.len()) as u32).to_ne_bytes());
        buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf.extend_from_slice(&[0; 10]);
        buf.extend_from_slice(&err);
        assert_eq!(parse(&buf).error, Some(ENOENT));
        // A truncated or garbage buffer yields nothing, and no panic.
        assert_eq!(parse(&buf[..10]), Received::default());
        assert_eq!(parse(&[0xff; 40]), Received::default());
        assert!(delete_request(1, &[0xff; 3], &addrs(&[[10, 244, 0, 5]])).is_none());
    }

    #[test]
    fn the_dump_request_is_a_ctnetlink_get_dump_for_ipv4() {
        let r = dump_request(3);
        assert_eq!(r.len(), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), CT_GET);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(r[16], AF_INET);
    }
}
