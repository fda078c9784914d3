//! CNI spec versions: what Weft speaks, and which commands each allows.

/// Spec versions Weft speaks, oldest first. The plugin answers VERSION
/// with them, the agent accepts them, the conflist lists them.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used to shape replies when the config names none
/// that Weft speaks.
pub const NEWEST: &str = "1.1.0";

/// Whether `version` is one Weft speaks.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The oldest version that defines `command`: CHECK came with 0.4.0, GC
/// and STATUS with 1.1.0; the others are in every version.
pub fn min_version(command: &str) -> Option<&'static str> {
    match command {
        "CHECK" => Some("0.4.0"),
        "GC" | "STATUS" => Some("1.1.0"),
        _ => None,
    }
}

/// `version` as (major, minor, patch); `None` for anything malformed.
pub fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

/// Whether `version` is at least `min` (both well-formed).
pub fn at_least(version: &str, min: &str) -> bool {
    matches!((parse_version(version), parse_version(min)), (Some(v), Some(m)) if v >= m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(at_least("1.1.0", "0.4.0"));
        assert!(at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(!at_least("1.0", "0.4.0"));
        assert!(is_supported("0.3.1") && !is_supported("0.2.0"));
        assert_eq!(SUPPORTED_VERSIONS.last(), Some(&NEWEST));
    }
}
