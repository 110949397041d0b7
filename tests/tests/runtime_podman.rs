//! Podman 4.3 as a real client of `kiln`: `run --rm` with exit codes, `run -d`, `exec`, `logs`,
//! `stop` and `rm`, `--memory` enforced in the guest, env and workdir, a terminal (`-t`, with
//! `tty` naming the container's own `/dev/pts/0`, for `run -t` and `exec -t`), and `kiln kill
//! --all` reaching a container's background processes.
//! No registry: a busybox-static rootfs is `podman import`ed. Podman gets an isolated
//! `--root`/`--runroot` and a containers.conf (cgroupfs, file events, nofile within the host's
//! limit, no network) through `CONTAINERS_CONF`; kiln is reached through a wrapper script that
//! sets its environment (kernel, guest-init) and its own `--root`.

mod runtime_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_tests::guests::TempDir;
use runtime_common::{kiln_bin, kiln_env};

struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new() -> Option<Podman> {
        if Command::new("podman").arg("--version").output().is_err() {
            eprintln!("!!! podman not installed: runtime_podman tests cannot run");
            return None;
        }
        let dir = TempDir::new("rt-podman");
        let p = dir.path();
        let wrapper = p.join("kiln-wrapper");
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in kiln_env() {
            script.push_str(&format!("export {k}='{}'\n", v.display()));
        }
        script.push_str(&format!(
            "exec '{}' --root '{}' \"$@\"\n",
            kiln_bin().display(),
            p.join("kiln-root").display()
        ));
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            p.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\"]\nnetns = \"none\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 runtime = \"kiln\"\n[engine.runtimes]\nkiln = [\"{}\"]\n",
                wrapper.display()
            ),
        )
        .unwrap();
        let pm = Podman { dir };
        // A busybox-static root file system as an image.
        let rootfs = pm.dir.path().join("rootfs");
        kiln_tests::e2e::busybox_tree(&rootfs).unwrap();
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
        let tar = pm.dir.path().join("bb.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let o = pm.run(&["import", tar.to_str().unwrap(), "localhost/kiln-bb:latest"]);
        assert!(o.status.success(), "podman import failed");
        Some(pm)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let p = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", p.join("containers.conf"))
            .arg("--root")
            .arg(p.join("storage"))
            .arg("--runroot")
            .arg(p.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let o = kiln_tests::bounded::output(
            &mut self.cmd(args),
            kiln_tests::bounded::VM_WAIT,
            &format!("podman {args:?}"),
        );
        eprintln!(
            "podman {args:?} -> {:?}\n  stdout: {}\n  stderr: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).trim_end(),
            String::from_utf8_lossy(&o.stderr).trim_end()
        );
        o
    }

    fn kiln_root(&self) -> PathBuf {
        self.dir.path().join("kiln-root")
    }
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn no_kiln_leftovers(root: &Path) {
    let left: Vec<_> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "state left in {}: {left:?}",
        root.display()
    );
    assert!(runtime_common::processes_mentioning(root.to_str().unwrap()).is_empty());
}

#[test]
fn runtime_podman_run_exec_logs_stop_memory_env_tty() {
    if !kiln_tests::require_kvm("runtime_podman_run_exec_logs_stop_memory_env_tty") {
        return;
    }
    let Some(pm) = Podman::new() else {
        panic!("podman is required for this test");
    };
    let img = "localhost/kiln-bb:latest";
    let o = pm.run(&["run", "--rm", img, "sh", "-c", "echo hi from kiln; exit 4"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(out(&o), "hi from kiln\n");

    // env and workdir; `-v DIR:/data:ro`, a host directory carried in as a disk (a copy).
    let data = pm.dir.path().join("host-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "from the host\n").unwrap();
    let volume = format!("{}:/data:ro", data.display());
    let o = pm.run(&[
        "run",
        "--rm",
        "-e",
        "HELLO=world",
        "-w",
        "/tmp",
        "-v",
        &volume,
        img,
        "sh",
        "-c",
        "echo $HELLO $(pwd); cat /data/f",
    ]);
    assert_eq!(out(&o), "world /tmp\nfrom the host\n");

    // --memory: memory.max in the guest cgroup, and exceeding it is an OOM kill (137).
    let o = pm.run(&[
        "run",
        "--rm",
        "--memory",
        "64m",
        img,
        "sh",
        "-c",
        "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max; \
         x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    ]);
    assert_eq!(out(&o), "67108864\n");
    assert_eq!(o.status.code(), Some(137));

    // A terminal: conmon's console socket; the size reaches the guest, and the pty is the
    // container's own /dev/pts/0 (allocated from the container's devpts), so `tty` names it.
    let o = in_script(&format!(
        "stty rows 33 cols 91; {} run -t --rm {img} sh -c 'tty; stty size; exit 3'",
        shell_words(&pm.cmd(&[]))
    ));
    eprintln!("podman run -t: {:?} {}", o.status.code(), out(&o));
    assert!(out(&o).contains("33 91"), "{}", out(&o));
    assert!(out(&o).contains("/dev/pts/0"), "{}", out(&o));
    assert!(!out(&o).contains("not a tty"), "{}", out(&o));
    assert_eq!(o.status.code(), Some(3));

    // run -d, exec, logs, stop, rm.
    let o = pm.run(&[
        "run",
        "-d",
        "--name",
        "d1",
        img,
        "sh",
        "-c",
        "echo started; sleep 1000",
    ]);
    assert!(o.status.success());
    let o = pm.run(&["exec", "d1", "sh", "-c", "echo in-exec; exit 6"]);
    assert_eq!(o.status.code(), Some(6));
    assert_eq!(out(&o), "in-exec\n");
    // exec -t: a pty from the container's devpts too (the main process has none: pts/0).
    let o = in_script(&format!(
        "{} exec -t d1 sh -c 'tty; exit 5'",
        shell_words(&pm.cmd(&[]))
    ));
    eprintln!("podman exec -t: {:?} {}", o.status.code(), out(&o));
    assert!(out(&o).contains("/dev/pts/0"), "{}", out(&o));
    assert_eq!(o.status.code(), Some(5));
    let o = pm.run(&["logs", "d1"]);
    assert_eq!(out(&o), "started\n");
    let o = pm.run(&["stop", "-t", "1", "d1"]);
    assert!(o.status.success());
    let o = pm.run(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        "d1",
    ]);
    assert_eq!(out(&o), "exited 137\n");
    assert!(pm.run(&["rm", "d1"]).status.success());

    kill_all(&pm, img);
    no_kiln_leftovers(&pm.kiln_root());
}

/// `kiln kill --all ID TERM` on a podman container reaches every process: a background
/// subshell (its TERM trap prints `child-got-term`) and a background `sleep`. The main shell,
/// init of the container's pid namespace, has no TERM handler and ignores TERM, as under runc;
/// it ends once its children are gone. Signalling only the main process would end nothing.
fn kill_all(pm: &Podman, img: &str) {
    let script = "(trap 'echo child-got-term; exit 0' TERM; echo ready; sleep 1000 & wait) & \
                  sleep 1000 & wait; echo main-done";
    let o = pm.run(&["run", "-d", "--name", "k1", img, "sh", "-c", script]);
    assert!(o.status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !out(&pm.run(&["logs", "k1"])).contains("ready") {
        assert!(std::time::Instant::now() < deadline, "k1 never got ready");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let id = out(&pm.run(&["inspect", "--format", "{{.Id}}", "k1"]))
        .trim()
        .to_string();
    let o = bounded(
        Command::new(pm.dir.path().join("kiln-wrapper")).args(["kill", "--all", &id, "TERM"]),
    );
    assert!(o.status.success(), "kiln kill --all: {o:?}");
    let o = bounded(&mut pm.cmd(&["wait", "k1"]));
    assert_eq!(out(&o).trim(), "0", "podman wait k1: {o:?}");
    let o = pm.run(&["logs", "k1"]);
    assert!(out(&o).contains("child-got-term"), "{}", out(&o));
    assert!(out(&o).contains("main-done"), "{}", out(&o));
    assert!(pm.run(&["rm", "k1"]).status.success());
}

/// Runs `c` under `timeout 300` (killed after 5 minutes) and collects its output.
fn bounded(c: &mut Command) -> Output {
    let mut t = Command::new("timeout");
    t.args(["-s", "KILL", "300"]).arg(c.get_program());
    t.args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    // `timeout` kills podman; the bounded wait also stops waiting for pipes its children hold.
    let o =
        kiln_tests::bounded::output(&mut t, kiln_tests::bounded::VM_WAIT, "podman under timeout");
    eprintln!(
        "{:?} -> {:?}\n  stdout: {}\n  stderr: {}",
        c.get_program(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    );
    o
}

/// Runs the shell command `cmd` on a fresh terminal (`script`), at most 5 minutes.
fn in_script(cmd: &str) -> Output {
    bounded(Command::new("script").args(["-qec", cmd, "/dev/null"]))
}

/// The podman command line of `c` as one shell string (paths have no quotes).
fn shell_words(c: &Command) -> String {
    let mut s = String::new();
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!(
                "{}='{}' ",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    s.push_str(&c.get_program().to_string_lossy());
    for a in c.get_args() {
        s.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    s
}
