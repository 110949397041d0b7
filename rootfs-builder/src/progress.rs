//! Progress reporting: a single updating line on a terminal, plain lines otherwise, or the `log`
//! crate for library users that do not care.

use std::io::{IsTerminal, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Receives progress while an image is built. Implementations must be cheap: `advance` is called
/// for every read of a layer.
pub trait Progress: Send + Sync {
    /// A new stage started (`applying layer 2/3`, `mkfs.ext4`...).
    fn message(&self, msg: &str);
    /// `done` of `total` bytes of the current stage are processed.
    fn advance(&self, _done: u64, _total: u64) {}
    /// The build ended (successfully or not).
    fn finish(&self) {}
}

/// Sends stage messages to `log::info!`.
pub struct LogProgress;

impl Progress for LogProgress {
    fn message(&self, msg: &str) {
        log::info!("{msg}");
    }
}

/// Prints one line per stage on stderr (for logs and pipes).
pub struct PlainProgress;

impl Progress for PlainProgress {
    fn message(&self, msg: &str) {
        eprintln!("rootfs-builder: {msg}");
    }
}

/// Redraws one status line on stderr at most ten times a second.
pub struct TerminalProgress {
    state: Mutex<TermState>,
}

struct TermState {
    stage: String,
    last: Option<Instant>,
    drawn: bool,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress {
            state: Mutex::new(TermState {
                stage: String::new(),
                last: None,
                drawn: false,
            }),
        }
    }
}

impl Progress for TerminalProgress {
    fn message(&self, msg: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.stage = msg.to_string();
            s.last = Some(Instant::now());
            s.drawn = true;
            let _ = write!(std::io::stderr(), "\r\x1b[K{msg}");
        }
    }

    fn advance(&self, done: u64, total: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        let now = Instant::now();
        if s.last
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
            && done < total
        {
            return;
        }
        s.last = Some(now);
        s.drawn = true;
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[K{}: {:.1}/{:.1} MiB ({pct}%)",
            s.stage,
            done as f64 / 1048576.0,
            total as f64 / 1048576.0
        );
    }

    fn finish(&self) {
        if let Ok(mut s) = self.state.lock() {
            if s.drawn {
                let _ = writeln!(std::io::stderr(), "\r\x1b[K{}", s.stage);
                s.drawn = false;
            }
        }
    }
}

/// The progress reporter a command-line tool should use: a status line when stderr is a
/// terminal, plain lines otherwise.
pub fn for_stderr() -> std::sync::Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        std::sync::Arc::new(TerminalProgress::default())
    } else {
        std::sync::Arc::new(PlainProgress)
    }
}

/// A reader that reports how much of a known total has been read.
pub struct Counting<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    progress: &'a dyn Progress,
}

impl<'a, R> Counting<'a, R> {
    /// Wraps `inner`, whose size is `total`.
    pub fn new(inner: R, total: u64, progress: &'a dyn Progress) -> Self {
        Counting {
            inner,
            done: 0,
            total,
            progress,
        }
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.progress.advance(self.done, self.total);
        Ok(n)
    }
}
