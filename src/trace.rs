//! W3C Trace Context (<https://www.w3.org/TR/trace-context/> §3.2): the `traceparent`
//! a producer put on a message, carried on to panels and the MQTT mirror so a trace can
//! be followed from the producer to the panel.
//!
//! The Azure SDKs put it in the application property `Diagnostic-Id` (and some
//! producers in `traceparent`); older SDKs wrote a hierarchical `Request-Id` there
//! (`|abc.1.`), which is not trace context and is dropped. Only a valid value is passed
//! on, never a malformed one.

/// Length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
pub const TRACEPARENT_LEN: usize = 55;

/// A valid `traceparent` value (55 ASCII characters).
pub type TraceParent = heapless::String<TRACEPARENT_LEN>;

/// Application properties a `traceparent` is taken from, first found wins.
pub const PROPERTIES: [&str; 2] = ["traceparent", "Diagnostic-Id"];

/// `value` as a `traceparent` to pass on, or `None` when it is not one (§3.2.2):
/// lowercase hex fields `version-trace_id-parent_id-flags`; version `ff` is invalid; an
/// all-zero trace or parent id is invalid; version 00 is exactly 55 characters; a higher
/// version may be longer, and then its first 55 characters (followed by `-`) are read
/// and passed on. Surrounding spaces and tabs are ignored.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let v = value.trim_matches([' ', '\t']);
    let head = v.get(..TRACEPARENT_LEN)?;
    let b = head.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|c| *c == b'0');
    let (version, trace_id, parent_id, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    let dashes = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
    let valid = dashes
        && hex(version)
        && version != b"ff"
        && hex(trace_id)
        && !zero(trace_id)
        && hex(parent_id)
        && !zero(parent_id)
        && hex(flags);
    let length_ok = if version == b"00" {
        v.len() == TRACEPARENT_LEN
    } else {
        v.len() == TRACEPARENT_LEN || v.as_bytes()[TRACEPARENT_LEN] == b'-'
    };
    if !(valid && length_ok) {
        return None;
    }
    TraceParent::try_from(head).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn valid_values_pass_and_malformed_ones_are_dropped() {
        assert_eq!(parse_traceparent(OK).as_deref(), Some(OK));
        assert_eq!(parse_traceparent(&format!(" {OK}\t")).as_deref(), Some(OK));
        // A higher version with more fields: its first 55 characters.
        let v1 = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra";
        assert_eq!(parse_traceparent(v1).as_deref(), Some(&v1[..55]));
        for bad in [
            "",
            "|abc.1.",                                                  // old Request-Id
            &OK[..54],                                                  // short
            &format!("{OK}-x"),                                         // 00 with more
            &OK.to_uppercase(),                                         // uppercase hex
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  // version ff
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",  // zero trace id
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  // zero parent id
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",  // separator
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",  // not hex
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x", // higher, no dash
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\u{e9}", // not ASCII
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }
}
