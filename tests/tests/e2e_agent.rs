//! End to end in a real Linux guest (issue 3): kiln's kernel, guest-init as PID 1, a
//! busybox-static image built by rootfs-builder, driven over vsock by `kiln_protocol`'s client
//! through `kiln_runtime::vm`, the launcher the runtime uses.
//!
//! The guest boots once per backend; every case then runs in it, in sequence, each reported on
//! its own `e2e[<backend>] <case>: ok|FAILED` line (a failing case does not hide the others; the
//! test fails at the end listing them). After the cases, the measurements (start to agent
//! ready, start to the exit of `/bin/true`, vsock throughput both ways, health round trip) are
//! printed as a table.
//!
//! - `e2e_agent_qemu_tcg`: QEMU `-M microvm` with TCG and `vhost-device-vsock`; runs everywhere
//!   (no KVM needed).
//! - `e2e_agent_host_vmm`: the same cases under host-vmm, when `Backend::detect()` says this
//!   host's KVM runs Linux userspace (not on PVM hosts; the test prints why it did not run).
//!
//! Run with `cargo test -p kiln-tests --test e2e_agent -- --nocapture` to see the report.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use kiln_protocol::codec::write_frame;
use kiln_protocol::{
    ClientError, ErrorKind, Event, ExitStatus, Hello, HostMessage, ProtocolVersion, Resources,
    StdioStream, INIT_EXEC_ID, PROTOCOL_VERSION,
};
use kiln_runtime::vm::{Accel, Backend};
use kiln_tests::e2e::{
    container_spec, expect_error, malformed_frame_keeps_the_connection, process, read_all, sh,
    Guest,
};
use sha2::{Digest, Sha256};

/// Boots a guest on `backend`, runs every case and the measurements, fails listing failed cases.
fn run_all(backend: Backend, tag: &str) {
    let label = backend.to_string();
    eprintln!("e2e[{label}]: booting");
    let guest = Guest::boot(backend, tag).unwrap_or_else(|e| panic!("e2e[{label}]: {e:#}"));
    let ready = guest.vm.timings().agent_ready.unwrap_or_default();
    eprintln!("e2e[{label}]: agent ready {ready:?} after start");
    // First, while nothing else ran: start -> exit of /bin/true in a new container.
    let first_true = first_true_container(&guest);

    let mut failed = Vec::new();
    for (name, case) in CASES {
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| case(&guest)));
        let took = started.elapsed();
        match result {
            Ok(()) => eprintln!("e2e[{label}] {name}: ok ({took:.2?})"),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("e2e[{label}] {name}: FAILED ({took:.2?}): {why}");
                failed.push(*name);
            }
        }
    }
    // The agent must have survived everything.
    let alive = guest.client.health().is_ok() && guest.vm.try_wait().ok().flatten().is_none();

    let m = measure(&guest);
    eprintln!(
        "e2e[{label}] measurements ({} vCPUs, {} MiB):",
        kiln_tests::e2e::VCPUS,
        kiln_tests::e2e::MEM_MIB
    );
    eprintln!("  start -> agent ready           {ready:>10.1?}");
    eprintln!("  start -> /bin/true exited      {first_true:>10.1?}");
    eprintln!("  exec /bin/true -> exited (med) {:>10.1?}", m.exec_true);
    eprintln!(
        "  vsock host -> guest            {:>7.1} MB/s",
        m.to_guest_mbps
    );
    eprintln!(
        "  vsock guest -> host            {:>7.1} MB/s",
        m.to_host_mbps
    );
    eprintln!(
        "  (same bytes through a pipe inside the guest: {:.1} MB/s)",
        m.in_guest_pipe_mbps
    );
    eprintln!(
        "  health round trip (med / p99)  {:>10.1?} / {:.1?}",
        m.health_median, m.health_p99
    );

    // Orderly end: the agent powers the VM off.
    let shutdown = guest.client.shutdown();
    let exited = guest.vm.wait_timeout(Duration::from_secs(60));
    eprintln!("e2e[{label}]: shutdown {shutdown:?}, VMM exit {exited:?}");
    if !failed.is_empty() || !alive {
        eprintln!("e2e[{label}]: console tail:\n{}", guest.vm.console_tail(60));
    }
    assert!(alive, "e2e[{label}]: agent or VM died during the cases");
    assert!(failed.is_empty(), "e2e[{label}]: failed cases: {failed:?}");
    assert!(shutdown.is_ok(), "e2e[{label}]: Shutdown call failed");
    assert!(
        matches!(exited, Ok(Some(_))),
        "e2e[{label}]: VM did not power off after Shutdown"
    );
}

#[test]
fn e2e_agent_qemu_tcg() {
    run_all(Backend::QemuMicrovm { accel: Accel::Tcg }, "e2e-tcg");
}

/// Boots the same image several times (`KILN_E2E_BOOTS`, default 5): every boot must reach the
/// agent (this caught `vhost-device-vsock` wedging when connected to during device activation),
/// and the start -> agent ready and start -> `/bin/true` exited times are printed with medians.
#[test]
fn e2e_repeated_boots_qemu_tcg() {
    let boots: usize = std::env::var("KILN_E2E_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut ready = Vec::new();
    let mut true_exit = Vec::new();
    for i in 0..boots {
        let guest = Guest::boot(Backend::QemuMicrovm { accel: Accel::Tcg }, "e2e-boots")
            .unwrap_or_else(|e| panic!("boot {i}: {e:#}"));
        let r = guest.vm.timings().agent_ready.unwrap_or_default();
        let t = first_true_container(&guest);
        eprintln!("e2e boot {i}: agent ready {r:.2?}, /bin/true exited {t:.2?}");
        ready.push(r);
        true_exit.push(t);
    }
    ready.sort();
    true_exit.sort();
    eprintln!(
        "e2e qemu-microvm (tcg), {boots} boots: start -> agent ready median {:.2?} (min {:.2?}), \
         start -> /bin/true exited median {:.2?} (min {:.2?})",
        percentile(&ready, 0.5),
        ready[0],
        percentile(&true_exit, 0.5),
        true_exit[0]
    );
}

#[test]
fn e2e_agent_host_vmm() {
    let detection = Backend::detect();
    match detection.backend {
        Backend::HostVmm { .. } => {
            eprintln!("e2e: host-vmm selected: {}", detection.reason);
            run_all(detection.backend, "e2e-host-vmm");
        }
        _ => eprintln!(
            "e2e[host-vmm]: NOT RUN on this host: {} (the QEMU TCG run covers the cases)",
            detection.reason
        ),
    }
}

/// A case: panics on failure.
type Case = fn(&Guest);

/// Every case, in the order they run. Each uses its own container ids.
const CASES: &[(&str, Case)] = &[
    ("exit codes 0/1/3/137", case_exit_codes),
    ("stdout and stderr kept apart", case_stdout_stderr_apart),
    ("8 MiB stdin -> stdout, sha256", case_stdin_stdout_8mib),
    ("20 concurrent execs", case_twenty_concurrent_execs),
    ("killed by a signal", case_killed_by_signal),
    ("500 orphans reaped, no zombies", case_zombies_reaped),
    ("memory.max OOM kill reported", case_memory_max_oom),
    ("pids.max enforced", case_pids_max),
    ("hostname and env applied", case_hostname_env),
    ("malformed / oversize / wrong version", case_bad_frames),
];

/// The kind of an agent error.
fn agent_error(e: ClientError) -> ErrorKind {
    match e {
        ClientError::Agent(reply) => reply.kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

/// Start to the exit of `/bin/true` as a container's main process (measured from VM launch).
fn first_true_container(g: &Guest) -> Duration {
    g.start_container("true0", container_spec(process(&["/bin/true"]), true));
    let status = g.client.wait("true0", INIT_EXEC_ID).expect("wait true0");
    let at = g.vm.since_launch();
    assert_eq!(status, ExitStatus::Exited(0));
    g.client.remove("true0", false).expect("remove true0");
    at
}

fn case_exit_codes(g: &Guest) {
    g.sleeper("exit", true);
    for (exec, script, want) in [
        ("e0", "exit 0", ExitStatus::Exited(0)),
        ("e1", "exit 1", ExitStatus::Exited(1)),
        ("e3", "exit 3", ExitStatus::Exited(3)),
        ("e137", "kill -9 $$", ExitStatus::Signaled(9)),
    ] {
        let (status, _, err) = g.run("exit", exec, sh(script));
        assert_eq!(status, want, "`{script}` (stderr {err:?})");
    }
    assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
    // A container's main process exit code.
    g.start_container("exit3", container_spec(sh("exit 3"), true));
    assert_eq!(
        g.client.wait("exit3", INIT_EXEC_ID).unwrap(),
        ExitStatus::Exited(3)
    );
    g.client.remove("exit3", false).unwrap();
    g.client.remove("exit", true).unwrap();
}

fn case_stdout_stderr_apart(g: &Guest) {
    g.sleeper("apart", true);
    let (status, out, err) = g.run(
        "apart",
        "small",
        sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"),
    );
    assert_eq!(status, ExitStatus::Exited(0));
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("out1\nout2\n", "err1\nerr2\n")
    );
    // Both streams busy at once, larger than a pipe buffer.
    let (status, out, err) = g.run(
        "apart",
        "big",
        sh("head -c 300000 /dev/zero | tr '\\0' o & head -c 200000 /dev/zero | tr '\\0' e >&2; wait"),
    );
    assert_eq!(status, ExitStatus::Exited(0));
    assert!(
        out.len() == 300_000 && out.bytes().all(|b| b == b'o'),
        "stdout {} bytes",
        out.len()
    );
    assert!(
        err.len() == 200_000 && err.bytes().all(|b| b == b'e'),
        "stderr {} bytes",
        err.len()
    );
    g.client.remove("apart", true).unwrap();
}

/// Pseudo-random bytes (a multiplicative hash of the offset).
fn data(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

fn case_stdin_stdout_8mib(g: &Guest) {
    g.sleeper("cat", true);
    g.client.exec("cat", "cat", process(&["cat"])).unwrap();
    let mut stdin = g.attach("cat", "cat", StdioStream::Stdin);
    let stdout = g.attach("cat", "cat", StdioStream::Stdout);
    let input = data(8 << 20);
    let want = Sha256::digest(&input);
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).expect("writing stdin");
        stdin
            .shutdown(std::net::Shutdown::Write)
            .expect("closing stdin");
    });
    let got = read_all(stdout);
    let took = started.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert_eq!(Sha256::digest(&got), want, "sha256 differs");
    assert_eq!(g.client.wait("cat", "cat").unwrap(), ExitStatus::Exited(0));
    eprintln!(
        "    8 MiB through cat in {took:.2?} ({:.1} MB/s each way)",
        8.0 * 1.048_576 / took.as_secs_f64()
    );
    g.client.remove("cat", true).unwrap();
}

fn case_twenty_concurrent_execs(g: &Guest) {
    g.sleeper("many", true);
    let started = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                s.spawn(move || {
                    let script =
                        format!("sleep 1; echo exec-{i}; echo err-{i} >&2; exit {}", i % 7);
                    g.run("many", &format!("x{i}"), sh(&script))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    for (i, (status, out, err)) in results.into_iter().enumerate() {
        assert_eq!(status, ExitStatus::Exited(i as i32 % 7), "exec {i}");
        assert_eq!(out, format!("exec-{i}\n"));
        assert_eq!(err, format!("err-{i}\n"));
    }
    // Twenty one-second sleeps in sequence would take 20 s.
    assert!(took < Duration::from_secs(15), "not concurrent: {took:?}");
    g.client.remove("many", true).unwrap();
}

fn case_killed_by_signal(g: &Guest) {
    let c = g.new_client();
    let events = c.take_events().unwrap();
    g.sleeper("sig", true);
    for (exec, signal) in [("term", 15), ("kill", 9)] {
        c.exec("sig", exec, process(&["sleep", "1000"])).unwrap();
        c.signal("sig", exec, signal).unwrap();
        assert_eq!(c.wait("sig", exec).unwrap(), ExitStatus::Signaled(signal));
    }
    // ProcessExited events for both.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok(Event::ProcessExited {
            container_id,
            exec_id,
            status,
        }) = events.recv_timeout(Duration::from_millis(200))
        {
            if container_id == "sig" {
                seen.push((exec_id, status));
            }
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("kill".to_string(), ExitStatus::Signaled(9)),
            ("term".to_string(), ExitStatus::Signaled(15))
        ]
    );
    g.client.remove("sig", true).unwrap();
}

/// The number of zombie processes in the guest (the container has no pid namespace, so its
/// /proc shows every guest process).
fn zombies(g: &Guest, exec: &str) -> usize {
    let (status, out, err) = g.run(
        "reap",
        exec,
        sh("grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l"),
    );
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("zombie count {out:?}"))
}

fn case_zombies_reaped(g: &Guest) {
    g.sleeper("reap", false);
    let script = "i=0; while [ $i -lt 500 ]; do (true &); i=$((i+1)); done; echo spawned $i";
    let (status, out, err) = g.run("reap", "orphans", sh(script));
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    assert_eq!(out, "spawned 500\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let mut count = zombies(g, "z0");
    while count > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        n += 1;
        count = zombies(g, &format!("z{n}"));
    }
    assert_eq!(count, 0, "zombies left in the guest");
    g.client.remove("reap", true).unwrap();
}

fn case_memory_max_oom(g: &Guest) {
    let c = g.new_client();
    let events = c.take_events().unwrap();
    let mut spec = container_spec(process(&["sleep", "1000000"]), true);
    spec.linux.resources = Resources {
        memory_limit: Some(32 << 20),
        ..Default::default()
    };
    g.start_container("oom", spec);
    assert_eq!(c.stats("oom").unwrap().memory_max, Some(32 << 20));
    let (status, out, _) = g.run(
        "oom",
        "hog",
        sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}"),
    );
    assert_eq!(
        status,
        ExitStatus::Signaled(9),
        "hog not OOM-killed: {out:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut oom = false;
    while !oom && Instant::now() < deadline {
        oom = matches!(
            events.recv_timeout(Duration::from_millis(200)),
            Ok(Event::OomKilled { ref container_id }) if container_id == "oom"
        );
    }
    assert!(oom, "no OomKilled event for the container");
    assert!(c.stats("oom").unwrap().oom_kills >= 1);
    // The agent survives and the container still runs processes.
    c.health().unwrap();
    let (status, out, _) = g.run("oom", "after", sh("echo still here"));
    assert_eq!(
        (status, out.as_str()),
        (ExitStatus::Exited(0), "still here\n")
    );
    c.remove("oom", true).unwrap();
}

fn case_pids_max(g: &Guest) {
    let mut spec = container_spec(process(&["sleep", "1000000"]), true);
    spec.linux.resources = Resources {
        pids_limit: Some(16),
        ..Default::default()
    };
    g.start_container("pids", spec);
    assert_eq!(g.client.stats("pids").unwrap().pids_max, Some(16));
    let (_, out, err) = g.run(
        "pids",
        "forks",
        sh("for i in $(seq 40); do sleep 30 >/dev/null 2>&1 & done; echo spawned"),
    );
    let stats = g.client.stats("pids").unwrap();
    assert!(stats.pids_current <= 16, "{stats:?}");
    assert!(
        err.contains("fork") || err.contains("Resource temporarily unavailable"),
        "no fork failure under pids.max=16: stdout {out:?} stderr {err:?}"
    );
    g.client.remove("pids", true).unwrap();
}

fn case_hostname_env(g: &Guest) {
    g.sleeper("env", true);
    let mut p =
        sh("echo \"$KILN_E2E\"; echo \"$SECOND\"; hostname; cat /proc/sys/kernel/hostname; pwd");
    p.cwd = "/tmp".into();
    p.env.push("SECOND=2".into());
    let (status, out, err) = g.run("env", "env", p);
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["env from the spec", "2", "kiln-e2e", "kiln-e2e", "/tmp"],
        "{out}"
    );
    // Exactly the spec's environment (nothing inherited from guest-init).
    let (_, out, _) = g.run("env", "env2", process(&["env"]));
    let mut vars: Vec<&str> = out.lines().collect();
    vars.sort();
    assert_eq!(vars, ["KILN_E2E=env from the spec", "PATH=/bin"], "{out}");
    g.client.remove("env", true).unwrap();
}

/// Reads one agent frame, expecting an error of `kind`.
fn case_bad_frames(g: &Guest) {
    // Malformed first frame.
    let mut s = g.connect_raw();
    s.write_all(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]).unwrap();
    expect_error(&mut s, ErrorKind::MalformedFrame, "malformed first frame");
    g.new_client().health().unwrap();
    // Oversize length.
    let mut s = g.connect_raw();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    expect_error(&mut s, ErrorKind::FrameTooLarge, "oversize length");
    g.new_client().health().unwrap();
    // Wrong version.
    let mut s = g.connect_raw();
    let hello = HostMessage::Hello(Hello {
        version: ProtocolVersion {
            major: PROTOCOL_VERSION.major + 98,
            minor: 0,
        },
        client: "from the future".into(),
    });
    write_frame(&mut s, &hello).unwrap();
    expect_error(&mut s, ErrorKind::IncompatibleVersion, "wrong version");
    g.new_client().health().unwrap();
    // A malformed frame after the handshake: error reply, the connection goes on.
    malformed_frame_keeps_the_connection(&mut g.connect_raw());
    // The shared client is unaffected, and errors of calls are typed.
    g.client.health().unwrap();
    assert_eq!(
        agent_error(g.client.wait("no-such", "").unwrap_err()),
        ErrorKind::NotFound
    );
}

/// Numbers printed after the cases.
struct Measurements {
    exec_true: Duration,
    to_guest_mbps: f64,
    to_host_mbps: f64,
    in_guest_pipe_mbps: f64,
    health_median: Duration,
    health_p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(g: &Guest) -> Measurements {
    let c = &g.client;
    g.sleeper("bench", true);
    let mut execs = Vec::new();
    for i in 0..10 {
        let exec = format!("t{i}");
        let started = Instant::now();
        c.exec("bench", &exec, process(&["/bin/true"])).unwrap();
        assert_eq!(c.wait("bench", &exec).unwrap(), ExitStatus::Exited(0));
        execs.push(started.elapsed());
    }
    execs.sort();

    const LEN: usize = 32 << 20;
    c.exec("bench", "sink", sh("cat > /dev/null")).unwrap();
    let mut stdin = g.attach("bench", "sink", StdioStream::Stdin);
    let chunk = data(1 << 20);
    let started = Instant::now();
    for _ in 0..LEN >> 20 {
        stdin.write_all(&chunk).unwrap();
    }
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.wait("bench", "sink").unwrap(), ExitStatus::Exited(0));
    let to_guest = started.elapsed();

    c.exec("bench", "source", sh(&format!("head -c {LEN} /dev/zero")))
        .unwrap();
    let started = Instant::now();
    let out = read_all(g.attach("bench", "source", StdioStream::Stdout));
    let to_host = started.elapsed();
    assert_eq!(out.len(), LEN);
    c.wait("bench", "source").unwrap();

    // The same bytes through a pipe inside the guest, for scale (the guest's own copy speed):
    // exec-to-exit time minus that of /bin/true.
    let started = Instant::now();
    c.exec(
        "bench",
        "pipe",
        sh(&format!("head -c {LEN} /dev/zero | cat > /dev/null")),
    )
    .unwrap();
    assert_eq!(c.wait("bench", "pipe").unwrap(), ExitStatus::Exited(0));
    let pipe = started.elapsed().saturating_sub(percentile(&execs, 0.5));

    let mut rtts: Vec<Duration> = (0..300)
        .map(|_| {
            let started = Instant::now();
            c.health().unwrap();
            started.elapsed()
        })
        .collect();
    rtts.sort();
    c.remove("bench", true).unwrap();
    let mbps = |d: Duration| LEN as f64 / 1e6 / d.as_secs_f64();
    Measurements {
        exec_true: percentile(&execs, 0.5),
        to_guest_mbps: mbps(to_guest),
        to_host_mbps: mbps(to_host),
        in_guest_pipe_mbps: mbps(pipe),
        health_median: percentile(&rtts, 0.5),
        health_p99: percentile(&rtts, 0.99),
    }
}
