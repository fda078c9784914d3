//! Typed values parsed once at the edge: node names, container ids, interface
//! names, MAC and underlay addresses. Everything past the gRPC layer holds
//! these instead of raw strings, so a bad value cannot reach the database.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use thiserror::Error;

/// Free text in a request (pod namespace, name, uid) may be at most this long.
pub const MAX_TEXT: usize = 253;

/// A value failed validation; `field` is the request field it came from.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A Kubernetes node name: a DNS-1123 subdomain (lower-case letters,
    /// digits, '-' and '.', starting and ending alphanumeric, ≤ 253 bytes).
    NodeName
);
string_newtype!(
    /// A CNI container id: letters, digits, '_', '.', '-', starting with a
    /// letter or digit (CNI spec, "Parameters").
    ContainerId
);
string_newtype!(
    /// A Linux interface name inside the pod: ≤ 15 bytes, no '/', no
    /// whitespace, not "." or "..".
    IfName
);

impl FromStr for NodeName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 253 {
            return Err(format!("{} bytes, at most 253 allowed", s.len()));
        }
        let allowed =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if let Some(c) = s.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "{s:?} contains {c:?}; use lower-case letters, digits, '-' and '.'"
            ));
        }
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !edge_ok(s.chars().next()) || !edge_ok(s.chars().last()) {
            return Err(format!("{s:?} must start and end with a letter or digit"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl FromStr for ContainerId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 256 {
            return Err(format!("{} bytes, at most 256 allowed", s.len()));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if let Some(c) = s.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "{s:?} contains {c:?}; allowed are letters, digits, '_', '.', '-'"
            ));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!("{s:?} must start with a letter or digit"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl FromStr for IfName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        // IFNAMSIZ is 16 including the trailing NUL.
        if s.len() > 15 {
            return Err(format!("{s:?} is {} bytes, at most 15 allowed", s.len()));
        }
        if s == "." || s == ".." {
            return Err(format!("{s:?} is not a valid interface name"));
        }
        if let Some(c) = s
            .chars()
            .find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(format!("{s:?} contains {c:?}"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A unicast Ethernet address, written "aa:bb:cc:dd:ee:ff": never all
/// zero, never a group address. Both the server (what a node may register)
/// and the agent (what it programs) use this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// A locally administered unicast address (02:…) with the given tail.
    pub fn local_unicast(tail: [u8; 5]) -> Self {
        let [a, b, c, d, e] = tail;
        Self([0x02, a, b, c, d, e])
    }

    fn check(octets: [u8; 6]) -> Result<Self, String> {
        if octets == [0; 6] {
            return Err("the all-zero address".into());
        }
        // A VTEP answers unicast; the I/G bit marks group addresses.
        if octets[0] & 1 == 1 {
            return Err("a multicast address".into());
        }
        Ok(Self(octets))
    }
}

impl TryFrom<[u8; 6]> for MacAddr {
    type Error = String;

    fn try_from(octets: [u8; 6]) -> Result<Self, Self::Error> {
        Self::check(octets)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address like 02:42:ac:11:00:02");
        let mut octets = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Self::check(octets).map_err(|why| format!("{s:?} is {why}"))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The IPv4 address a node's VXLAN packets leave from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnderlayIp(Ipv4Addr);

impl UnderlayIp {
    pub fn addr(self) -> Ipv4Addr {
        self.0
    }
}

impl TryFrom<Ipv4Addr> for UnderlayIp {
    type Error = String;

    fn try_from(ip: Ipv4Addr) -> Result<Self, Self::Error> {
        if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
            return Err(format!("{ip} cannot be a tunnel endpoint"));
        }
        Ok(Self(ip))
    }
}

impl FromStr for UnderlayIp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ip: Ipv4Addr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
        Self::try_from(ip)
    }
}

impl fmt::Display for UnderlayIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The Kubernetes pod an attachment belongs to; free text, bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One pod interface as the container runtime names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    pub container_id: ContainerId,
    pub ifname: IfName,
}

/// Parses `value` as `T`, naming `field` in the error.
pub fn parse_field<T>(field: &'static str, value: &str) -> Result<T, InvalidField>
where
    T: FromStr<Err = String>,
{
    value
        .parse()
        .map_err(|reason| InvalidField::new(field, reason))
}

/// Accepts free text up to `max` bytes without control characters.
pub fn bounded_text(field: &'static str, value: &str, max: usize) -> Result<String, InvalidField> {
    if value.len() > max {
        return Err(InvalidField::new(
            field,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidField::new(field, "contains control characters"));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_dns_1123() {
        for ok in ["node-a", "n1", "worker.example.com", "a"] {
            assert!(ok.parse::<NodeName>().is_ok(), "{ok}");
        }
        for bad in ["", "Node", "-a", "a-", "a_b", "a b", &"x".repeat(254)] {
            assert!(bad.parse::<NodeName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn container_ids_follow_the_cni_spec() {
        for ok in ["abc123", "a.b-c_d", "0"] {
            assert!(ok.parse::<ContainerId>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a/b", "a b", "ä"] {
            assert!(bad.parse::<ContainerId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ifnames_fit_ifnamsiz_and_have_no_slash() {
        for ok in ["eth0", "net1", "a23456789012345"] {
            assert!(ok.parse::<IfName>().is_ok(), "{ok}");
        }
        for bad in ["", "a234567890123456", "a/b", ".", "..", "e th", "a:1"] {
            assert!(bad.parse::<IfName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_addresses_round_trip_and_reject_group_or_zero() {
        let mac: MacAddr = "02:42:AC:11:00:02".parse().unwrap();
        assert_eq!(mac.to_string(), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "zz:42:ac:11:00:02",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:42:ac:11:0:2",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn underlay_ips_must_be_unicast_ipv4() {
        assert!("198.51.100.7".parse::<UnderlayIp>().is_ok());
        for bad in [
            "",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "2001:db8::1",
            "198.51.100",
        ] {
            assert!(bad.parse::<UnderlayIp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bounded_text_rejects_long_or_control_text() {
        assert!(bounded_text("f", "default", 253).is_ok());
        assert_eq!(
            bounded_text("f", &"x".repeat(254), 253).unwrap_err().field,
            "f"
        );
        assert!(bounded_text("f", "a\nb", 253).is_err());
    }
}
