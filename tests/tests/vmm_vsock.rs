//! host-vmm virtio-vsock tests on KVM. The test guest's minimal vsock driver
//! (`tests/guests/src/vsock*.rs`) runs one `vsock-*` mode; this side speaks the hybrid
//! unix-socket protocol (`CONNECT <port>\n` / `OK <port>\n`, and `<uds>_<port>` listeners for
//! guest-initiated connections) and checks every byte with sha256.
//!
//! Covered: host→guest and guest→host connections, 16 MiB echo, throughput each way (printed),
//! credit exhaustion and recovery, RST on closed ports both ways, 64 concurrent connections.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_tests::guests::{guest, host_vmm, pseudo_random, Guest, TempDir, VmOutput};
use kiln_tests::require_kvm;
use sha2::{Digest, Sha256};

const CID: u32 = 3;
/// Generous: the guest runs in emulated ring 0 on this machine's PVM.
const VM_TIMEOUT: Duration = Duration::from_secs(180);
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A running VM whose console is read line by line while the test talks to it.
struct VsockVm {
    child: Option<Child>,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    uds: PathBuf,
    start: Instant,
    _dir: TempDir,
    /// Kills host-vmm after [`VM_LIFETIME`]: whatever waits on it then ends.
    _watchdog: kiln_tests::bounded::Watchdog,
}

/// How long one VM of these tests may run at all.
const VM_LIFETIME: Duration = Duration::from_secs(300);

impl VsockVm {
    /// Boots the PVH test guest with `kiln.test=<mode>` plus `cmdline`, a vsock device at
    /// `<dir>/vsock.sock`. `before` runs first with the socket path (to bind `<uds>_<port>`).
    fn start(mode: &str, cmdline: &str, before: impl FnOnce(&PathBuf)) -> VsockVm {
        Self::start_with(mode, cmdline, &[], before)
    }

    /// [`VsockVm::start`] with extra host-vmm arguments.
    fn start_with(
        mode: &str,
        cmdline: &str,
        args: &[&std::ffi::OsStr],
        before: impl FnOnce(&PathBuf),
    ) -> VsockVm {
        let dir = TempDir::new(&format!("vsock-{mode}"));
        let uds = dir.path().join("vsock.sock");
        before(&uds);
        let mut child = Command::new(host_vmm())
            .arg("--kernel")
            .arg(guest(Guest::Pvh))
            .args(args)
            .arg("--vsock-uds")
            .arg(&uds)
            .args(["--cid", &CID.to_string(), "--mem-mib", "128"])
            .arg("--cmdline")
            .arg(format!("kiln.test={mode} {cmdline}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning host-vmm");
        let (tx, lines) = channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let acc = stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                acc.lock().unwrap().push_str(&line);
                acc.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let err = child.stderr.take().expect("stderr");
        let acc = stderr.clone();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err).read_to_string(&mut s);
            acc.lock().unwrap().push_str(&s);
        });
        VsockVm {
            _watchdog: kiln_tests::bounded::Watchdog::kill_after(&child, VM_LIFETIME, "host-vmm"),
            child: Some(child),
            lines,
            stdout,
            stderr,
            uds,
            start: Instant::now(),
            _dir: dir,
        }
    }

    fn describe(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the guest's `KILN-TEST <key>=<value>` line and returns the value.
    fn wait_report(&self, key: &str) -> String {
        let prefix = format!("KILN-TEST {key}=");
        let deadline = Instant::now() + VM_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = line.strip_prefix(&prefix) {
                        return v.to_string();
                    }
                    if line.starts_with("KILN-TEST vsock.error") || line.contains("panic=") {
                        panic!("guest failed: {line}\n{}", self.describe());
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!("guest never reported `{key}`\n{}", self.describe())
                }
            }
        }
    }

    /// Opens a host-initiated connection to guest `port`: the stream after `OK <port>\n`.
    fn connect(&self, port: u32) -> UnixStream {
        match try_connect(&self.uds, port) {
            Ok(s) => s,
            Err(e) => panic!("CONNECT {port}: {e}\n{}", self.describe()),
        }
    }

    /// Waits for the VM to exit and returns its output.
    fn finish(mut self) -> VmOutput {
        let mut child = self.child.take().expect("child");
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break Some(st);
            }
            if self.start.elapsed() > VM_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(5));
        };
        // The reader threads end at EOF, shortly after the process.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.lines.recv_timeout(Duration::from_millis(50)).is_ok()
            && Instant::now() < deadline
        {}
        thread::sleep(Duration::from_millis(50));
        let out = VmOutput {
            status,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.start.elapsed(),
        };
        assert_eq!(
            out.code(),
            Some(0),
            "VM did not exit cleanly\n{}",
            out.describe()
        );
        assert!(out.saw("done"), "guest did not finish\n{}", out.describe());
        assert!(out.get("vsock.error").is_none(), "{}", out.describe());
        assert!(out.get("panic").is_none(), "{}", out.describe());
        assert_eq!(out.expect("vsock.cid"), CID.to_string());
        for key in [
            "vsock.credit_violations",
            "vsock.bad_packets",
            "vsock.bad_used",
        ] {
            assert_eq!(out.expect(key), "0", "{key}\n{}", out.describe());
        }
        assert_eq!(
            out.expect("vsock.device_status"),
            "0xf",
            "{}",
            out.describe()
        );
        out
    }
}

impl Drop for VsockVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The hybrid-vsock handshake. Errors if the connection closes before `OK`.
fn try_connect(uds: &PathBuf, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        line.push(b[0]);
        if line.len() > 32 {
            return Err(std::io::Error::other("handshake reply too long"));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let Some(p) = text.trim_end().strip_prefix("OK ") else {
        return Err(std::io::Error::other(format!("bad reply {text:?}")));
    };
    p.parse::<u32>()
        .map_err(|_| std::io::Error::other(format!("bad port in {text:?}")))?;
    Ok(s)
}

/// Writes `data` (then shuts down the write half) while reading everything back; returns what
/// came back and the elapsed time.
fn echo(stream: UnixStream, data: Arc<Vec<u8>>) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut writer = stream.try_clone().expect("clone");
    let w = thread::spawn(move || {
        for chunk in data.chunks(64 * 1024) {
            writer.write_all(chunk).expect("write to guest");
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let mut back = Vec::new();
    let mut r = stream;
    r.read_to_end(&mut back).expect("read echo");
    w.join().expect("writer");
    (back, start.elapsed())
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

#[test]
fn vsock_host_to_guest_echo_16mib() {
    if !require_kvm("vsock_host_to_guest_echo_16mib") {
        return;
    }
    let vm = VsockVm::start("vsock-echo-server", "kiln.vsock.buf=131072", |_| {});
    assert_eq!(vm.wait_report("vsock.listening"), "5000");
    let data = Arc::new(pseudo_random(16 << 20, 0x7673_6f63));
    let (back, t) = echo(vm.connect(5000), data.clone());
    eprintln!(
        "vsock echo 16 MiB host->guest->host: {:.1} MB/s each way ({:?})",
        mbps(data.len(), t),
        t
    );
    assert_eq!(back.len(), data.len(), "echoed length");
    assert_eq!(sha(&back), sha(&data), "echoed bytes differ");
    let out = vm.finish();
    assert_eq!(out.expect("vsock.accepted"), "1");
    assert_eq!(out.expect("vsock.closed"), "1");
    assert_eq!(out.expect("vsock.bytes_rx"), (16u64 << 20).to_string());
    assert_eq!(out.expect("vsock.bytes_tx"), (16u64 << 20).to_string());
}

#[test]
fn vsock_after_the_block_device() {
    if !require_kvm("vsock_after_the_block_device") {
        return;
    }
    let disk_dir = TempDir::new("vsock-blk");
    let disk = disk_dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).expect("disk image");
    let uds = disk_dir.path().join("probe.sock");
    let out = kiln_tests::guests::boot_guest(
        Guest::Pvh,
        "bootinfo",
        &[
            "--rootfs",
            disk.to_str().expect("utf-8"),
            "--vsock-uds",
            uds.to_str().expect("utf-8"),
            "--cid",
            "7",
        ],
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let cmdline = out.expect("cmdline");
    let blk = cmdline.find("virtio_mmio.device=4K@0xd0000000:5");
    let vsock = cmdline.find("virtio_mmio.device=4K@0xd0001000:6");
    assert!(
        blk.is_some() && vsock.is_some() && blk < vsock,
        "block first, then vsock: {cmdline:?}"
    );
    assert!(!uds.exists(), "host-vmm left its socket behind");
    // The driver finds the vsock device in the second slot and it works there.
    let args = [std::ffi::OsStr::new("--rootfs"), disk.as_os_str()];
    let vm = VsockVm::start_with("vsock-echo-server", "", &args, |_| {});
    vm.wait_report("vsock.listening");
    let data = Arc::new(pseudo_random(100_000, 3));
    let (back, _) = echo(vm.connect(5000), data.clone());
    assert_eq!(sha(&back), sha(&data));
    vm.finish();
}

#[test]
fn vsock_data_in_the_connect_write_is_kept() {
    if !require_kvm("vsock_data_in_the_connect_write_is_kept") {
        return;
    }
    let vm = VsockVm::start("vsock-echo-server", "", |_| {});
    vm.wait_report("vsock.listening");
    // The handshake line and the first bytes in one write, before the guest accepted: the
    // bytes must wait for the connection, not be taken as part of the handshake.
    let mut s = UnixStream::connect(&vm.uds).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(b"CONNECT 5000\nearly bytes").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read");
    let text = String::from_utf8_lossy(&got);
    let rest = text
        .strip_prefix("OK ")
        .and_then(|t| t.split_once('\n'))
        .map(|(_, r)| r);
    assert_eq!(rest, Some("early bytes"), "reply {text:?}");
    vm.finish();
}

#[test]
fn vsock_guest_to_host_echo() {
    if !require_kvm("vsock_guest_to_host_echo") {
        return;
    }
    let listener: Arc<Mutex<Option<UnixListener>>> = Arc::new(Mutex::new(None));
    let l2 = listener.clone();
    let vm = VsockVm::start("vsock-connect", "kiln.vsock.conns=2", move |uds| {
        let path = format!("{}_6000", uds.display());
        *l2.lock().unwrap() = Some(UnixListener::bind(&path).expect("bind <uds>_6000"));
    });
    let listener = listener.lock().unwrap().take().expect("listener");
    let mut handles = Vec::new();
    for i in 0..2u64 {
        let stream = kiln_tests::bounded::accept(&listener, IO_TIMEOUT, "the guest");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let data = Arc::new(pseudo_random((4 << 20) + i as usize * 4099, 17 + i));
        handles.push(thread::spawn(move || {
            let (back, t) = echo(stream, data.clone());
            (sha(&back) == sha(&data), back.len(), data.len(), t)
        }));
    }
    for h in handles {
        let (same, got, want, t) = h.join().expect("echo thread");
        eprintln!(
            "vsock guest-initiated echo of {want} bytes: {:.1} MB/s each way",
            mbps(want, t)
        );
        assert_eq!(got, want, "echoed length");
        assert!(same, "echoed bytes differ");
    }
    let out = vm.finish();
    assert_eq!(out.expect("vsock.connected"), "2", "{}", out.describe());
    assert_eq!(out.expect("vsock.closed"), "2");
}

#[test]
fn vsock_throughput_each_way() {
    if !require_kvm("vsock_throughput_each_way") {
        return;
    }
    // Host -> guest: the guest consumes and counts.
    let vm = VsockVm::start("vsock-sink", "kiln.vsock.buf=131072", |_| {});
    vm.wait_report("vsock.listening");
    let data = pseudo_random(16 << 20, 5);
    let mut s = vm.connect(5000);
    let start = Instant::now();
    s.write_all(&data).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut count = Vec::new();
    s.read_to_end(&mut count).expect("read count");
    let t_in = start.elapsed();
    assert_eq!(count, (data.len() as u64).to_le_bytes(), "guest byte count");
    vm.finish();

    // Guest -> host: the guest sends a pattern.
    let vm = VsockVm::start("vsock-source", "kiln.vsock.bytes=16777216", |_| {});
    vm.wait_report("vsock.listening");
    let mut s = vm.connect(5000);
    let start = Instant::now();
    let mut got = Vec::with_capacity(16 << 20);
    s.read_to_end(&mut got).expect("read");
    let t_out = start.elapsed();
    assert_eq!(got.len(), 16 << 20, "source length");
    let pattern: Vec<u8> = (0..8192u64)
        .flat_map(|k| pattern_word(k).to_le_bytes())
        .collect();
    for (i, chunk) in got.chunks(pattern.len()).enumerate() {
        assert_eq!(chunk, &pattern[..chunk.len()], "source chunk {i}");
    }
    // The guest only half-closed (SHUTDOWN SEND): the host can still send to it.
    s.write_all(b"bye")
        .expect("write after the guest's half close");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read after RST");
    assert!(rest.is_empty(), "{rest:?}");
    let out = vm.finish();
    assert_eq!(out.expect("vsock.bytes_rx"), "3", "{}", out.describe());
    assert_eq!(out.expect("vsock.closed"), "1");
    eprintln!(
        "vsock 16 MiB: host->guest {:.1} MB/s ({:?}), guest->host {:.1} MB/s ({:?})",
        mbps(data.len(), t_in),
        t_in,
        mbps(got.len(), t_out),
        t_out
    );
}

/// The guest's source pattern (tests/guests/src/vsock_modes.rs).
fn pattern_word(k: u64) -> u64 {
    (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (k << 3)
}

#[test]
fn vsock_credit_exhaustion_and_recovery() {
    if !require_kvm("vsock_credit_exhaustion_and_recovery") {
        return;
    }
    const BUF: u64 = 4096;
    let vm = VsockVm::start("vsock-credit", &format!("kiln.vsock.buf={BUF}"), |_| {});
    vm.wait_report("vsock.listening");
    let data = Arc::new(pseudo_random(2 << 20, 11));
    let stream = vm.connect(5000);
    let written = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let mut writer = stream.try_clone().expect("clone");
    let (d, w) = (data.clone(), written.clone());
    let wt = thread::spawn(move || {
        for chunk in d.chunks(4096) {
            writer.write_all(chunk).expect("write");
            w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let e = echoed.clone();
    let mut reader = stream;
    let rt = thread::spawn(move || {
        let mut back = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    back.extend_from_slice(&buf[..n]);
                    e.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(err) => panic!("read echo: {err}"),
            }
        }
        back
    });
    // The guest consumes nothing: the writer must stall, with nothing echoed and nothing lost.
    thread::sleep(Duration::from_millis(1500));
    let stalled_at = written.load(Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1000));
    let later = written.load(Ordering::SeqCst);
    assert_eq!(
        stalled_at, later,
        "writer kept going while the guest had no credit"
    );
    assert!(
        stalled_at < data.len() as u64 / 2,
        "writer got {stalled_at} bytes into a guest advertising {BUF}"
    );
    assert_eq!(echoed.load(Ordering::SeqCst), 0, "echo while paused");
    eprintln!("vsock credit: writer stalled after {stalled_at} bytes (buf_alloc {BUF})");

    // Resume: a byte on the control port.
    let mut ctl = vm.connect(5001);
    ctl.write_all(b"g").expect("control write");
    ctl.shutdown(std::net::Shutdown::Write)
        .expect("control shutdown");
    assert_eq!(vm.wait_report("vsock.credit.resumed"), "1");
    wt.join().expect("writer");
    let back = rt.join().expect("reader");
    let mut rest = Vec::new();
    let _ = ctl.read_to_end(&mut rest);
    assert_eq!(back.len(), data.len(), "echoed length");
    assert_eq!(sha(&back), sha(&data), "echoed bytes differ");
    let out = vm.finish();
    let unconsumed: u64 = out
        .expect("vsock.credit.paused_unconsumed")
        .parse()
        .unwrap();
    assert_eq!(
        unconsumed, BUF,
        "the host should fill exactly the advertised buffer"
    );
    assert_eq!(
        out.expect("vsock.credit.paused_bytes_rx"),
        BUF.to_string(),
        "bytes delivered while paused"
    );
    let requests: u64 = out
        .expect("vsock.credit.paused_credit_requests")
        .parse()
        .unwrap();
    eprintln!("vsock credit: {requests} CREDIT_REQUESTs from the host while paused");
    assert!(
        requests <= 16,
        "the device kept asking for credit while the guest had none to give ({requests} \
         CREDIT_REQUESTs in 2.5 s)\n{}",
        out.describe()
    );
    assert!(
        out.expect("vsock.credit_updates_tx")
            .parse::<u64>()
            .unwrap()
            > 0,
        "guest sent no CREDIT_UPDATE"
    );
}

#[test]
fn vsock_slow_host_reader_stalls_the_guest_sender() {
    if !require_kvm("vsock_slow_host_reader_stalls_the_guest_sender") {
        return;
    }
    // The other direction of flow control: the host reads nothing for a while, so the guest
    // must run out of the device's credit and wait; nothing may be lost or reset.
    const BYTES: usize = 4 << 20;
    let vm = VsockVm::start("vsock-source", &format!("kiln.vsock.bytes={BYTES}"), |_| {});
    vm.wait_report("vsock.listening");
    let mut s = vm.connect(5000);
    thread::sleep(Duration::from_millis(1500));
    let mut got = Vec::with_capacity(BYTES);
    s.read_to_end(&mut got).expect("read");
    assert_eq!(got.len(), BYTES, "source length");
    let pattern: Vec<u8> = (0..8192u64)
        .flat_map(|k| pattern_word(k).to_le_bytes())
        .collect();
    for (i, chunk) in got.chunks(pattern.len()).enumerate() {
        assert_eq!(chunk, &pattern[..chunk.len()], "source chunk {i}");
    }
    drop(s);
    let out = vm.finish();
    assert!(
        out.expect("vsock.credit_requests_tx")
            .parse::<u64>()
            .unwrap()
            >= 1,
        "the guest never ran out of credit\n{}",
        out.describe()
    );
    assert_eq!(out.expect("vsock.closed"), "1");
}

#[test]
fn vsock_rst_on_closed_ports() {
    if !require_kvm("vsock_rst_on_closed_ports") {
        return;
    }
    let vm = VsockVm::start("vsock-rst", "", |_| {});
    assert_eq!(
        vm.wait_report("vsock.rst.connect"),
        "rst",
        "guest connect to a closed host port"
    );
    assert_eq!(vm.wait_report("vsock.rst.stray"), "rst");
    vm.wait_report("vsock.listening");
    // Host CONNECT to a guest port nobody listens on: closed without OK.
    let err = try_connect(&vm.uds, 5002).expect_err("CONNECT to a closed guest port succeeded");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    // The device still serves: a good port works afterwards.
    let mut s = vm.connect(5000);
    s.write_all(b"q").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to EOF");
    let out = vm.finish();
    assert_eq!(
        out.expect("vsock.rst_sent_unknown"),
        "1",
        "{}",
        out.describe()
    );
    assert_eq!(out.expect("vsock.refused"), "1");
    assert_eq!(out.expect("vsock.accepted"), "1");
}

#[test]
fn vsock_device_reset_ends_connections() {
    if !require_kvm("vsock_device_reset_ends_connections") {
        return;
    }
    let vm = VsockVm::start("vsock-reset", "", |_| {});
    vm.wait_report("vsock.listening");
    let mut old = vm.connect(5000);
    old.write_all(b"x").expect("write");
    assert_eq!(vm.wait_report("vsock.reset.open_before"), "1");
    assert_eq!(vm.wait_report("vsock.reset"), "1");
    // The reset dropped the connection: EOF (or a reset) after at most the echoed byte.
    let mut rest = Vec::new();
    match old.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.len() <= 1, "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    vm.wait_report("vsock.listening");
    let data = Arc::new(pseudo_random(300_000, 77));
    let (back, _) = echo(vm.connect(5000), data.clone());
    assert_eq!(sha(&back), sha(&data), "echo after the reset");
    let out = vm.finish();
    assert_eq!(
        out.expect("vsock.accepted"),
        "1",
        "counters restart at the reset"
    );
}

#[test]
fn vsock_64_concurrent_connections() {
    if !require_kvm("vsock_64_concurrent_connections") {
        return;
    }
    const N: usize = 64;
    let vm = VsockVm::start(
        "vsock-echo-server",
        &format!("kiln.vsock.conns={N}"),
        |_| {},
    );
    vm.wait_report("vsock.listening");
    let streams: Vec<UnixStream> = (0..N).map(|_| vm.connect(5000)).collect();
    let start = Instant::now();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let data = Arc::new(pseudo_random(128 * 1024 + i * 37, 1000 + i as u64));
            thread::spawn(move || {
                let (back, _) = echo(s, data.clone());
                (
                    back.len() == data.len() && sha(&back) == sha(&data),
                    data.len(),
                )
            })
        })
        .collect();
    let mut total = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let (ok, len) = h.join().expect("echo thread");
        assert!(ok, "connection {i}: echo differs");
        total += len;
    }
    eprintln!(
        "vsock 64 connections: {total} bytes echoed in {:?} ({:.1} MB/s each way)",
        start.elapsed(),
        mbps(total, start.elapsed())
    );
    let out = vm.finish();
    assert_eq!(out.expect("vsock.accepted"), N.to_string());
    assert_eq!(out.expect("vsock.closed"), N.to_string());
    assert_eq!(
        out.expect("vsock.max_open"),
        N.to_string(),
        "all connections open at once\n{}",
        out.describe()
    );
}

#[test]
fn vsock_64_guest_initiated_connections() {
    if !require_kvm("vsock_64_guest_initiated_connections") {
        return;
    }
    const N: usize = 64;
    let listener: Arc<Mutex<Option<UnixListener>>> = Arc::new(Mutex::new(None));
    let l2 = listener.clone();
    let vm = VsockVm::start(
        "vsock-connect",
        &format!("kiln.vsock.conns={N}"),
        move |uds| {
            let path = format!("{}_6000", uds.display());
            *l2.lock().unwrap() = Some(UnixListener::bind(&path).expect("bind <uds>_6000"));
        },
    );
    let listener = listener.lock().unwrap().take().expect("listener");
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let stream = kiln_tests::bounded::accept(&listener, IO_TIMEOUT, "the guest");
            stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let data = Arc::new(pseudo_random(64 * 1024 + i * 101, 5000 + i as u64));
            thread::spawn(move || {
                let (back, _) = echo(stream, data.clone());
                back.len() == data.len() && sha(&back) == sha(&data)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert!(
            h.join().expect("echo thread"),
            "connection {i}: echo differs"
        );
    }
    let out = vm.finish();
    assert_eq!(
        out.expect("vsock.connected"),
        N.to_string(),
        "{}",
        out.describe()
    );
    assert_eq!(out.expect("vsock.closed"), N.to_string());
}
