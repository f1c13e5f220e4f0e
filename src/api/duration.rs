//! Durations as people type them on command lines and in flags: `30s`, `5m`, `24h`, `7d`,
//! `1h30m`, and `0` for "none" (a token that never expires, a feature turned off).

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a duration: {why} (examples: 90s, 30m, 24h, 7d, 0)")]
pub struct DurationError {
    pub given: String,
    pub why: String,
}

/// Parses a duration; a bare number is seconds.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| DurationError { given: s.to_string(), why: e.to_string() })
}

/// Parses a duration in whole seconds (what tokens and certificates are counted in).
pub fn parse_secs(s: &str) -> Result<u64, DurationError> {
    parse(s).map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_secs("24h").unwrap(), 86_400);
        assert_eq!(parse_secs("90s").unwrap(), 90);
        assert_eq!(parse_secs("7d").unwrap(), 7 * 86_400);
        assert_eq!(parse_secs("1h30m").unwrap(), 5_400);
        assert_eq!(parse_secs("0").unwrap(), 0);
        assert_eq!(parse_secs("45").unwrap(), 45);
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        let e = parse("1y2").unwrap_err();
        assert!(e.to_string().contains("\"1y2\" is not a duration"), "{e}");
        assert!(parse("h").is_err());
        assert!(parse("").is_err());
    }
}
