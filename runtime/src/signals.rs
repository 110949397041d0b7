//! Signal names and numbers as `kill` accepts them: `TERM`, `SIGTERM`, `term`, `15`.
//!
//! Numbers are Linux x86_64 numbers: the guest is always x86_64 Linux, whatever the host's libc.

use thiserror::Error;

/// A signal that is not known.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid signal: {0}")]
pub struct SignalError(pub String);

const NAMES: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Parses a signal name (with or without `SIG`, any case, `RTMIN+n`) or number (1..=64).
pub fn parse_signal(text: &str) -> Result<i32, SignalError> {
    let bad = || SignalError(text.to_string());
    if let Ok(n) = text.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, n)) = NAMES.iter().find(|(s, _)| *s == name) {
        return Ok(*n);
    }
    let rt = |base: i32, rest: &str, sign: i32| -> Result<i32, SignalError> {
        let off = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().map_err(|_| bad())?
        };
        let n = base + sign * off;
        if (34..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        }
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(34, rest.trim_start_matches('+'), 1);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(64, rest.trim_start_matches('-'), -1);
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_prefixes() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert_eq!(parse_signal("sigkill"), Ok(9));
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("SIGWINCH"), Ok(28));
        assert_eq!(parse_signal("RTMIN+2"), Ok(36));
        assert_eq!(parse_signal("SIGRTMAX"), Ok(64));
        assert!(parse_signal("FOO").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("RTMIN+40").is_err());
    }
}
