//! Bind mounts of host directories under the `kiln` runtime: each becomes an extra disk (a copy
//! of the directory packed at `create`) that guest-init mounts at the destination. One VM boot:
//! a read-only and a read-write bind in the same container; the container reads the host's
//! file, cannot write the read-only one, writes the read-write one, and nothing it writes
//! reaches the host directory. Refusals (a single-file bind, a missing source) need no VM.
//! The backend is whatever `kiln` picks on this host (QEMU TCG on PVM machines); the test
//! prints it.

mod runtime_common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use runtime_common::{stderr, Kiln};

/// A whole `kiln run` with a QEMU TCG boot takes well under a minute here.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// Runs `cmd` with stdout/stderr in files, killing it after `limit`.
fn run_bounded(mut cmd: Command, dir: &Path, tag: &str, limit: Duration) -> Output {
    let (o, e) = (
        dir.join(format!("{tag}.out")),
        dir.join(format!("{tag}.err")),
    );
    cmd.stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap());
    let mut child = cmd.spawn().expect("spawning kiln");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for kiln") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{tag}: kiln did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                std::fs::read_to_string(&o).unwrap_or_default(),
                std::fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&o).unwrap_or_default(),
        stderr: std::fs::read(&e).unwrap_or_default(),
    }
}

fn add_mounts(bundle: &Path, mounts: &[serde_json::Value]) {
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for m in mounts {
        spec["mounts"].as_array_mut().unwrap().push(m.clone());
    }
    std::fs::write(&path, spec.to_string()).unwrap();
}

#[test]
fn runtime_binds_host_directories_are_copied_into_the_vm() {
    if !kiln_tests::require_kvm("runtime_binds_host_directories_are_copied_into_the_vm") {
        return;
    }
    let k = Kiln::new("rt-binds");
    let data = k.scratch.path().join("host-data");
    let scratch = k.scratch.path().join("host-scratch");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(data.join("f"), "hello from the host\n").unwrap();
    std::fs::write(data.join("sub/g"), "nested\n").unwrap();
    std::fs::write(scratch.join("old"), "old\n").unwrap();
    let script = "cat /data/f /data/sub/g; \
                  if echo x > /data/x 2>/dev/null; then echo data-writable; else echo data-ro; fi; \
                  echo new > /scratch/new && cat /scratch/new /scratch/old; \
                  grep -E ' /(data|scratch) ' /proc/mounts | cut -d' ' -f2-4 | cut -d, -f1";
    let b = k.bundle("b", &["sh", "-c", script]);
    add_mounts(
        &b,
        &[
            serde_json::json!({"destination": "/data", "type": "bind",
                "source": data.to_str().unwrap(), "options": ["rbind", "ro", "nosuid"]}),
            serde_json::json!({"destination": "/scratch", "type": "bind",
                "source": scratch.to_str().unwrap(), "options": ["rbind", "rprivate"]}),
        ],
    );
    let started = Instant::now();
    // create (its stdout/stderr files become the container's), then state (the backend), start,
    // wait for the exit, read the output, delete.
    let o = run_bounded(
        k.cmd(&[
            "--debug",
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "binds",
        ]),
        k.scratch.path(),
        "create",
        RUN_TIMEOUT,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    eprintln!("kiln create took {:?}", started.elapsed());
    for line in stderr(&o).lines().filter(|l| l.contains("timing")) {
        eprintln!("{line}");
    }
    let state = k.state("binds").expect("state");
    eprintln!(
        "backend used: {}",
        state["annotations"]["io.kiln.backend"]
            .as_str()
            .unwrap_or("?")
    );
    assert!(k.run(&["start", "binds"]).status.success());
    assert!(
        k.wait_status("binds", "stopped", RUN_TIMEOUT),
        "container did not stop"
    );
    let out = std::fs::read_to_string(k.scratch.path().join("create.out")).unwrap();
    let err = std::fs::read_to_string(k.scratch.path().join("create.err")).unwrap();
    eprintln!("container stdout:\n{out}container stderr:\n{err}");
    assert_eq!(
        out,
        "hello from the host\nnested\ndata-ro\nnew\nold\n\
         /data ext4 ro\n/scratch ext4 rw\n"
    );
    // A copy: nothing written in the guest reaches the host directories.
    assert!(
        !scratch.join("new").exists(),
        "rw bind wrote back to the host"
    );
    assert!(!data.join("x").exists());
    let bind_image = k.root.join("binds").join("kiln-bind-1.ext4");
    assert!(bind_image.exists(), "rw copy in the state directory");
    assert!(k.run(&["delete", "binds"]).status.success());
    assert!(!k.root.join("binds").exists(), "delete removes the images");
}

#[test]
fn runtime_binds_refusals_are_one_line() {
    let k = Kiln::new("rt-binds-refused");
    let file = k.scratch.path().join("host-file");
    std::fs::write(&file, "x").unwrap();
    let b = k.bundle("b", &["true"]);
    add_mounts(
        &b,
        &[serde_json::json!({"destination": "/f", "type": "bind",
            "source": file.to_str().unwrap(), "options": ["rbind"]})],
    );
    let o = k.run(&["create", "--bundle", b.to_str().unwrap(), "c1"]);
    assert_eq!(o.status.code(), Some(1));
    let want = format!(
        "bind mount of host file {} on /f is not supported",
        file.display()
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "one line");
    assert!(!k.root.join("c1").exists(), "nothing half-written");

    let b2 = k.bundle("b2", &["true"]);
    add_mounts(
        &b2,
        &[serde_json::json!({"destination": "/d", "type": "bind",
            "source": "/nonexistent-kiln-bind", "options": ["rbind"]})],
    );
    let o = k.run(&["create", "--bundle", b2.to_str().unwrap(), "c2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bind mount source /nonexistent-kiln-bind on /d: No such file"),
        "{}",
        stderr(&o)
    );
    assert!(!k.root.join("c2").exists(), "nothing half-written");
}
