//! The caller's gRPC deadline, read from the `grpc-timeout` request header.
//!
//! tonic enforces that header only through its server-wide timeout layer and does not expose
//! its parser, so we read it here: the lock engine needs the deadline *before* it expires, to
//! stop waiting and answer `acquired: false` instead of being cut off mid-wait.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// How much earlier than the caller's deadline a wait ends, so the answer still reaches the
/// caller in time.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(20);

/// The `grpc-timeout` of a request: `1..=8` ASCII digits and a unit (H, M, S, m, u, n).
/// None when absent or malformed (a malformed header means "no deadline", as in tonic).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", value.parse().unwrap());
        map
    }

    #[test]
    fn every_unit_of_the_grpc_spec_is_understood() {
        assert_eq!(grpc_timeout(&with("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(&with("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&with("5S")), Some(Duration::from_secs(5)));
        assert_eq!(
            grpc_timeout(&with("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            grpc_timeout(&with("999u")),
            Some(Duration::from_micros(999))
        );
        assert_eq!(grpc_timeout(&with("7n")), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn malformed_headers_mean_no_deadline() {
        for bad in ["", "S", "12", "123456789S", "1x", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(&with(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
