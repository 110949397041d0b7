//! The `--log` / `--log-format` logger: runc-style text or JSON lines, one per message.
//!
//! containerd and podman read errors from the JSON log (`{"level":"error","msg":...,"time":...}`),
//! so the error that ends a command is logged here as well as printed on stderr. The shim keeps
//! logging into the same file after `create` has returned.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::cli::LogFormat;

/// Where log lines go.
struct Logger {
    file: Option<Mutex<File>>,
    format: LogFormat,
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record.level(), &record.args().to_string());
        match &self.file {
            Some(f) => {
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// One log line (with its newline) in `format`.
pub fn format_line(format: LogFormat, level: log::Level, msg: &str) -> String {
    let level = level.as_str().to_ascii_lowercase();
    let level = if level == "warn" {
        "warning".into()
    } else {
        level
    };
    let time = rfc3339(SystemTime::now(), false);
    match format {
        LogFormat::Json => {
            let v = serde_json::json!({ "level": level, "msg": msg, "time": time });
            format!("{v}\n")
        }
        LogFormat::Text => {
            let msg = serde_json::Value::String(msg.to_string());
            format!("time=\"{time}\" level={level} msg={msg}\n")
        }
    }
}

/// Installs the logger. A log file that cannot be opened falls back to stderr with a warning.
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) {
    let file = path.and_then(
        |p| match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                eprintln!("kiln: cannot open log file {}: {e}", p.display());
                None
            }
        },
    );
    // On stderr (which a client may pass on as the container's output) only warnings and
    // errors, like runc; a log file also gets the info lines (backend choice, timings).
    let level = if debug || std::env::var_os("KILN_DEBUG").is_some() {
        log::LevelFilter::Debug
    } else if file.is_some() {
        log::LevelFilter::Info
    } else {
        log::LevelFilter::Warn
    };
    let logger = Logger {
        file,
        format,
        level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

/// `time` as RFC 3339 in UTC (`2026-11-27T16:04:31Z`, or with nanoseconds).
pub fn rfc3339(time: SystemTime, nanos: bool) -> String {
    let d = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    if nanos {
        format!(
            "{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{:09}Z",
            d.subsec_nanos()
        )
    } else {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(0);
        assert_eq!(rfc3339(t, false), "1970-01-01T00:00:00Z");
        // 2024-02-29T12:34:56Z (a leap day)
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_709_210_096, 5);
        assert_eq!(rfc3339(t, false), "2024-02-29T12:34:56Z");
        assert_eq!(rfc3339(t, true), "2024-02-29T12:34:56.000000005Z");
    }

    #[test]
    fn json_line_has_runc_fields() {
        let line = format_line(
            LogFormat::Json,
            log::Level::Error,
            "container does not exist",
        );
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container does not exist");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        let text = format_line(LogFormat::Text, log::Level::Warn, "a \"quoted\" word");
        assert!(
            text.contains("level=warning msg=\"a \\\"quoted\\\" word\""),
            "{text}"
        );
    }
}
