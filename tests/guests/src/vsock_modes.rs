//! The `vsock-*` test modes: host-vmm's virtio-vsock device driven by [`crate::vsock_conn`].
//! The host half of each is in `tests/tests/vmm_vsock.rs`.
//!
//! | mode                | what the guest does                                                  |
//! |---------------------|----------------------------------------------------------------------|
//! | `vsock-echo-server` | listens on 5000, echoes every connection; ends after `kiln.vsock.conns` |
//! | `vsock-connect`     | opens `kiln.vsock.conns` connections to host port 6000 and echoes      |
//! | `vsock-sink`        | listens on 5000, counts bytes, answers the count (8 bytes LE) at EOF   |
//! | `vsock-source`      | listens on 5000, sends `kiln.vsock.bytes` pattern bytes, half-closes,  |
//! |                     | counts what the host sends after that, RST when the host is done       |
//! | `vsock-credit`      | echo on 5000 but consumes nothing until a byte arrives on port 5001    |
//! | `vsock-rst`         | connects to host port 6001 (no listener), sends a stray packet, then   |
//! |                     | serves port 5000 only (a CONNECT to any other port gets RST)           |
//! | `vsock-reset`       | echo on 5000; after the first bytes, resets and re-initialises the     |
//! |                     | device (status 0), then echoes one more connection                     |
//!
//! Options: `kiln.vsock.buf=` (buf_alloc per connection, default 64 KiB, at most 128 KiB),
//! `kiln.vsock.conns=` (default 1), `kiln.vsock.port=`, `kiln.vsock.bytes=` (source, default
//! 16 MiB), `kiln.vsock.timeout=` (seconds, default 90). Every mode prints
//! `vsock.listening=<port>` when the host may connect, then counters (`vsock.*`) at the end.

use crate::arch::{pause, rdtsc};
use crate::bootinfo::{parse_u64, BootInfo};
use crate::report;
use crate::vsock::{write_region, VsockDev, PATTERN, PATTERN_LEN};
use crate::vsock_conn::{App, Stack};

/// Listening port of the server modes.
pub const SERVER_PORT: u32 = 5000;
/// Control port of `vsock-credit`.
pub const CONTROL_PORT: u32 = 5001;
/// Host port `vsock-connect` connects to.
pub const HOST_PORT: u32 = 6000;
/// Host port nobody listens on (`vsock-rst`).
pub const CLOSED_HOST_PORT: u32 = 6001;
/// Host port of the stray packet (`vsock-rst`).
pub const STRAY_HOST_PORT: u32 = 6002;

/// TSC ticks per second, rounded up (the hosts here run at about 2.6 GHz); only for timeouts.
const TICKS_PER_SEC: u64 = 3_000_000_000;

fn param(boot: &BootInfo, key: &str, default: u64) -> u64 {
    boot.param(key).and_then(parse_u64).unwrap_or(default)
}

/// Word `k` of the source pattern; the host test computes the same.
pub fn pattern_word(k: u64) -> u64 {
    (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k << 3)
}

/// Runs one `vsock-*` mode.
pub fn run(boot: &BootInfo, mode: &[u8]) {
    let mut dev = match VsockDev::find(boot) {
        Ok(dev) => dev,
        Err(e) => {
            report!("vsock.error={:?}", e);
            return;
        }
    };
    report!("vsock.cid={}", dev.cid);
    let buf = param(boot, "kiln.vsock.buf", 64 * 1024).min(u64::from(u32::MAX)) as u32;
    let conns = param(boot, "kiln.vsock.conns", 1).min(crate::vsock::MAX_CONNS as u64 - 2) as u32;
    let timeout = param(boot, "kiln.vsock.timeout", 90).min(3600);
    let mut run = Run {
        st: Stack::new(dev.cid, buf),
        deadline: rdtsc().wrapping_add(timeout * TICKS_PER_SEC),
    };
    report!("vsock.buf_alloc={}", run.st.buf_alloc());
    let port = param(boot, "kiln.vsock.port", 0) as u32;
    let ok = match mode {
        b"vsock-echo-server" => run.serve(&mut dev, or(port, SERVER_PORT), App::Echo, conns),
        b"vsock-sink" => run.serve(&mut dev, or(port, SERVER_PORT), App::Sink, conns),
        b"vsock-source" => {
            fill_pattern();
            run.st.source_bytes = param(boot, "kiln.vsock.bytes", 16 << 20);
            run.serve(&mut dev, or(port, SERVER_PORT), App::Source, conns)
        }
        b"vsock-connect" => run.connect(&mut dev, or(port, HOST_PORT), conns),
        b"vsock-credit" => run.credit(&mut dev),
        b"vsock-rst" => run.rst(&mut dev),
        b"vsock-reset" => run.reset(&mut dev, boot),
        _ => {
            report!("error=unknown-mode");
            return;
        }
    };
    if !ok {
        report!("vsock.error=timeout");
    }
    let s = run.st.stats;
    report!("vsock.accepted={}", s.accepted);
    report!("vsock.connected={}", s.connected);
    report!("vsock.refused={}", s.refused);
    report!("vsock.closed={}", s.closed);
    report!("vsock.open={}", s.open);
    report!("vsock.max_open={}", s.max_open);
    report!("vsock.bytes_rx={}", s.bytes_rx);
    report!("vsock.bytes_tx={}", s.bytes_tx);
    report!("vsock.zero_copy={}", s.zero_copy);
    report!("vsock.max_unconsumed={}", s.max_unconsumed);
    report!("vsock.credit_violations={}", s.credit_violations);
    report!("vsock.credit_requests_rx={}", s.credit_requests_rx);
    report!("vsock.credit_requests_tx={}", s.credit_requests_tx);
    report!("vsock.credit_updates_tx={}", s.credit_updates_tx);
    report!("vsock.rst_sent_unknown={}", s.rst_sent_unknown);
    report!("vsock.rst_stray={}", s.rst_stray);
    report!("vsock.bad_packets={}", s.bad_packets);
    report!("vsock.bad_used={}", dev.bad_used);
    report!("vsock.device_status={:#x}", dev.device_status());
}

fn or(v: u32, default: u32) -> u32 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// Fills the 64 KiB source pattern, eight bytes at a time (cheap under instruction emulation).
fn fill_pattern() {
    for k in 0..PATTERN_LEN / 8 {
        write_region(PATTERN + k * 8, &pattern_word(k).to_le_bytes());
    }
}

struct Run {
    st: Stack,
    deadline: u64,
}

impl Run {
    /// Polls until `done` or the deadline; false on timeout.
    fn drive(&mut self, dev: &mut VsockDev, mut done: impl FnMut(&mut Stack) -> bool) -> bool {
        loop {
            self.st.poll(dev);
            if done(&mut self.st) {
                return true;
            }
            if rdtsc() > self.deadline {
                return false;
            }
            pause();
        }
    }

    fn serve(&mut self, dev: &mut VsockDev, port: u32, app: App, conns: u32) -> bool {
        self.st.listen(port, app, false);
        report!("vsock.listening={}", port);
        self.drive(dev, |st| st.stats.closed >= conns)
    }

    fn connect(&mut self, dev: &mut VsockDev, port: u32, conns: u32) -> bool {
        for _ in 0..conns {
            self.st.connect(port, App::Echo);
        }
        report!("vsock.connecting={}", conns);
        self.drive(dev, |st| st.stats.closed >= conns)
    }

    /// Echo on [`SERVER_PORT`] that consumes nothing until a byte arrives on [`CONTROL_PORT`]:
    /// the host writer must stall on credit, then everything must come back intact.
    fn credit(&mut self, dev: &mut VsockDev) -> bool {
        self.st.listen(SERVER_PORT, App::Echo, true);
        self.st.listen(CONTROL_PORT, App::Control, false);
        report!("vsock.listening={}", SERVER_PORT);
        if !self.drive(dev, |st| st.stats.control > 0) {
            return false;
        }
        let s = self.st.stats;
        report!("vsock.credit.paused_unconsumed={}", s.max_unconsumed);
        // Data bytes only: the control byte that ended the pause is not echo data.
        let data = s.bytes_rx - u64::from(s.control);
        report!("vsock.credit.paused_bytes_rx={}", data);
        report!(
            "vsock.credit.paused_credit_requests={}",
            s.credit_requests_rx
        );
        report!("vsock.credit.paused_credit_updates={}", s.credit_updates_tx);
        self.st.set_paused(App::Echo, false);
        report!("vsock.credit.resumed=1");
        self.drive(dev, |st| st.stats.accepted >= 2 && st.open() == 0)
    }

    /// Device reset with a connection open: the host must see it end; the device must then work
    /// as new.
    fn reset(&mut self, dev: &mut VsockDev, boot: &BootInfo) -> bool {
        self.st.listen(SERVER_PORT, App::Echo, false);
        report!("vsock.listening={}", SERVER_PORT);
        if !self.drive(dev, |st| st.stats.bytes_rx > 0) {
            return false;
        }
        let before = self.st.stats;
        report!("vsock.reset.open_before={}", before.open);
        *dev = match VsockDev::find(boot) {
            Ok(d) => d,
            Err(e) => {
                report!("vsock.error=reinit:{:?}", e);
                return true;
            }
        };
        self.st = Stack::new(dev.cid, self.st.buf_alloc());
        report!("vsock.reset=1");
        self.serve(dev, SERVER_PORT, App::Echo, 1)
    }

    /// RST paths: our REQUEST to a port without listener, a packet for no connection, and
    /// (host side) a CONNECT to a guest port nobody listens on.
    fn rst(&mut self, dev: &mut VsockDev) -> bool {
        self.st.listen(SERVER_PORT, App::Control, false);
        self.st.connect(CLOSED_HOST_PORT, App::Echo);
        if !self.drive(dev, |st| st.stats.refused + st.stats.connected > 0) {
            return false;
        }
        let answer = if self.st.stats.refused > 0 {
            "rst"
        } else {
            "accepted"
        };
        report!("vsock.rst.connect={}", answer);
        // A data packet for a connection that does not exist must get an RST.
        if !self.drive(dev, |_| true) || !self.st.send_stray(dev, STRAY_HOST_PORT, 7777) {
            return false;
        }
        if !self.drive(dev, |st| st.stats.rst_stray > 0) {
            return false;
        }
        report!("vsock.rst.stray=rst");
        report!("vsock.listening={}", SERVER_PORT);
        self.drive(dev, |st| st.stats.accepted >= 1 && st.open() == 0)
    }
}
