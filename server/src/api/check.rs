//! Request validation into weft-core's types (bad input becomes
//! INVALID_ARGUMENT naming the field) and the one place store errors
//! become gRPC statuses ([`status_from`]).

use std::net::Ipv4Addr;

use tonic::Status;
use tracing::warn;
use weft_core::domain::{
    Attachment, ContainerId, IfName, InvalidField, MAX_TEXT, bounded_text, parse_field,
};

use super::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use crate::store::StoreError;

// === validation helpers ===

pub(super) fn invalid(e: InvalidField) -> Status {
    Status::invalid_argument(e.to_string())
}

pub(super) fn check<T: std::str::FromStr<Err = String>>(
    field: &'static str,
    value: &str,
) -> Result<T, Status> {
    parse_field(field, value).map_err(invalid)
}

pub(super) fn check_text(field: &'static str, value: &str) -> Result<String, Status> {
    bounded_text(field, value, MAX_TEXT).map_err(invalid)
}

pub(super) fn check_optional<T: std::str::FromStr<Err = String>>(
    field: &'static str,
    value: &str,
) -> Result<Option<T>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        check(field, value).map(Some)
    }
}

pub(super) fn check_ipv4(field: &'static str, value: &str) -> Result<Ipv4Addr, Status> {
    value.parse().map_err(|_| {
        Status::invalid_argument(format!("invalid {field}: {value:?} is not an IPv4 address"))
    })
}

/// An address as the API prints it: bare ("10.244.3.7") or with the
/// block's prefix length ("10.244.3.7/24").
pub(super) fn check_address(field: &'static str, value: &str) -> Result<Ipv4Addr, Status> {
    let bare = match value.split_once('/') {
        Some((ip, len)) if len.parse::<u8>().is_ok_and(|l| l <= 32) => ip,
        Some(_) => {
            return Err(Status::invalid_argument(format!(
                "invalid {field}: {value:?} has a bad prefix length"
            )));
        }
        None => value,
    };
    bare.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "invalid {field}: {value:?} is not an IPv4 address like 10.244.3.7 or 10.244.3.7/24"
        ))
    })
}

pub(super) fn page_size(requested: u32) -> Result<u32, Status> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "invalid page_size: {n}, at most {MAX_PAGE_SIZE}"
        ))),
    }
}

pub(super) fn check_attachment(container_id: &str, ifname: &str) -> Result<Attachment, Status> {
    Ok(Attachment {
        container_id: check::<ContainerId>("container_id", container_id)?,
        ifname: check::<IfName>("ifname", ifname)?,
    })
}

/// The one place store errors become gRPC statuses.
pub(super) fn status_from(e: StoreError) -> Status {
    match e {
        StoreError::UnknownNode(_) => Status::not_found(e.to_string()),
        StoreError::BlockExhausted { .. } | StoreError::NoFreeBlock { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::NotAllocated(_) => Status::not_found(e.to_string()),
        StoreError::AttachmentOnOtherNode { .. }
        | StoreError::StaleEpoch { .. }
        | StoreError::NodeAlive { .. } => Status::failed_precondition(e.to_string()),
        StoreError::EndpointTaken { .. } => Status::already_exists(e.to_string()),
        StoreError::Conflict => Status::aborted(e.to_string()),
        // A database that restarts, fails over or is out of reach: the
        // caller retries (the CNI plugin answers 11, not 100).
        e if e.is_unavailable() => {
            warn!(error = %e, "database unavailable");
            Status::unavailable("database unavailable; retry")
        }
        // Internals stay in the log; the client gets a stable message. (A
        // shared failure is a snapshot read's: the database's, or corrupt
        // data; one that is unavailability is answered above.)
        StoreError::Database(_)
        | StoreError::Corrupt(_)
        | StoreError::TimedOut(_)
        | StoreError::Shared(_)
        | StoreError::LayoutMismatch { .. }
        | StoreError::LayoutChanged { .. } => {
            warn!(error = %e, "internal error");
            Status::internal("internal database error; see the server log")
        }
    }
}
