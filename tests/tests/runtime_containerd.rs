//! containerd 1.6 as a client of `kiln`, through its runc shim (`io.containerd.runc.v2` with
//! `--runc-binary`): `ctr run --rm` with output and exit code, `run -d` + `task exec` +
//! `task kill` + `task rm`. A private containerd (own root, state and socket) is started for the
//! test; the image is a busybox-static rootfs turned into an OCI archive by `podman save`.

mod runtime_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use kiln_tests::guests::TempDir;
use runtime_common::{kiln_bin, kiln_env};

struct Containerd {
    dir: TempDir,
    daemon: Child,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Containerd {
    fn start() -> Containerd {
        let dir = TempDir::new("rt-ctd");
        let p = dir.path();
        std::fs::write(
            p.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \
                 \"{0}/containerd.sock\"\n",
                p.display()
            ),
        )
        .unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(p.join("config.toml"))
            .stdout(std::fs::File::create(p.join("containerd.log")).unwrap())
            .stderr(std::fs::File::create(p.join("containerd.err")).unwrap())
            .spawn()
            .expect("containerd (apt-get install containerd)");
        let c = Containerd { dir, daemon };
        let started = Instant::now();
        while !c.dir.path().join("containerd.sock").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let o = kiln_tests::bounded::output(
            Command::new("ctr")
                .arg("--address")
                .arg(self.dir.path().join("containerd.sock"))
                .args(args),
            kiln_tests::bounded::VM_WAIT,
            &format!("ctr {args:?}"),
        );
        eprintln!(
            "ctr {args:?} -> {:?}\n  stdout: {}\n  stderr: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).trim_end(),
            String::from_utf8_lossy(&o.stderr).trim_end()
        );
        o
    }
}

/// An OCI archive of a busybox-static rootfs, made with podman (isolated storage).
fn busybox_oci_archive(dir: &Path) -> std::path::PathBuf {
    let rootfs = dir.join("rootfs");
    kiln_tests::e2e::busybox_tree(&rootfs).unwrap();
    let tar = dir.join("bb.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let podman = |args: &[&str]| {
        let o = kiln_tests::bounded::output(
            Command::new("podman")
                .arg("--root")
                .arg(dir.join("pm-storage"))
                .arg("--runroot")
                .arg(dir.join("pm-run"))
                .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
                .args(args),
            kiln_tests::bounded::VM_WAIT,
            &format!("podman {args:?}"),
        );
        assert!(
            o.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    podman(&["import", tar.to_str().unwrap(), "localhost/kiln-bb:latest"]);
    let archive = dir.join("bb-oci.tar");
    podman(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        archive.to_str().unwrap(),
        "localhost/kiln-bb:latest",
    ]);
    archive
}

#[test]
fn runtime_containerd_ctr_run_exec_kill() {
    if !kiln_tests::require_kvm("runtime_containerd_ctr_run_exec_kill") {
        return;
    }
    let c = Containerd::start();
    let p = c.dir.path().to_path_buf();
    let archive = busybox_oci_archive(&p);
    let o = c.ctr(&[
        "images",
        "import",
        "--base-name",
        "localhost/kiln-bb",
        archive.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    // kiln behind a wrapper that sets its environment (containerd passes its own --root).
    let wrapper = p.join("kiln-wrapper");
    let mut script = String::from("#!/bin/sh\n");
    for (k, v) in kiln_env() {
        script.push_str(&format!("export {k}='{}'\n", v.display()));
    }
    script.push_str(&format!("exec '{}' \"$@\"\n", kiln_bin().display()));
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let w = wrapper.to_str().unwrap();
    let img = "localhost/kiln-bb:latest";
    let rt = ["--runtime", "io.containerd.runc.v2", "--runc-binary", w];

    let mut args = vec!["run", "--rm"];
    args.extend(rt);
    args.extend([
        img,
        "kiln-ctd-1",
        "sh",
        "-c",
        "echo hi from containerd; exit 5",
    ]);
    let o = c.ctr(&args);
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi from containerd\n");

    let mut args = vec!["run", "-d"];
    args.extend(rt);
    args.extend([img, "kiln-ctd-2", "sleep", "1000"]);
    assert!(c.ctr(&args).status.success());
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "kiln-ctd-2",
        "sh",
        "-c",
        "echo exec-in-ctd; exit 2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "exec-in-ctd\n");
    assert!(c
        .ctr(&["task", "kill", "-s", "SIGKILL", "kiln-ctd-2"])
        .status
        .success());
    let started = Instant::now();
    loop {
        let o = c.ctr(&["task", "ls"]);
        if String::from_utf8_lossy(&o.stdout).contains("STOPPED") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "task did not stop"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.ctr(&["task", "rm", "kiln-ctd-2"]).status.success());
    assert!(c.ctr(&["containers", "rm", "kiln-ctd-2"]).status.success());
    assert!(!Path::new("/run/containerd/runc/default/kiln-ctd-2").exists());
    assert!(!Path::new("/run/containerd/runc/default/kiln-ctd-1").exists());
}
