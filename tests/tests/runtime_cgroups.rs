//! Host cgroups under the `kiln` runtime: a container whose spec names `linux.cgroupsPath` and
//! cpu/pids/memory limits gets that host cgroup in every mounted hierarchy (v1, hybrid or v2);
//! the shim and every VMM process (the shim's children: QEMU and vhost-device-vsock, or
//! host-vmm) are in it, the host limits are written (cpu as given, pids + the VMM allowance,
//! memory = VM RAM + the VMM overhead), `kiln ps` lists them, and `delete` removes the cgroup and
//! the parent kiln made. An invalid path is refused at `create` without a VM. The backend is
//! whatever `kiln` picks on this host (QEMU TCG on PVM machines).

mod runtime_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_runtime::cgroups::{hierarchies, HOST_PIDS_OVERHEAD, VMM_MEMORY_OVERHEAD_MIB};
use runtime_common::{stderr, Kiln};

/// Adds `linux.cgroupsPath` and `linux.resources` to the bundle's config.json.
fn set_cgroup(bundle: &Path, path: &str, resources: serde_json::Value) {
    let file = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    spec["linux"]["cgroupsPath"] = path.into();
    spec["linux"]["resources"] = resources;
    std::fs::write(&file, spec.to_string()).unwrap();
}

/// The container's directory in every hierarchy, with whether it is v2 and its v1 controllers.
fn cgroup_dirs(path: &str) -> Vec<(PathBuf, bool, Vec<String>)> {
    hierarchies()
        .expect("cgroup hierarchies")
        .into_iter()
        .map(|h| {
            (
                h.mount.join(path.trim_start_matches('/')),
                h.v2,
                h.controllers,
            )
        })
        .collect()
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_string()
}

/// Children of `pid` (all its threads').
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    out
}

/// Deletes the container even if the test fails half way.
struct Cleanup<'a>(&'a Kiln, &'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.0.root.join(self.1).exists() {
            let _ = self.0.run(&["delete", "--force", self.1]);
        }
    }
}

#[test]
fn runtime_cgroups_hold_the_vm_processes_and_limits() {
    if !kiln_tests::require_kvm("runtime_cgroups_hold_the_vm_processes_and_limits") {
        return;
    }
    let k = Kiln::new("rt-cgroups");
    let unique = format!(
        "kiln-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let parent = format!("/{unique}");
    let path = format!("{parent}/ctr");
    let bundle = k.bundle("b", &["sleep", "1000"]);
    set_cgroup(
        &bundle,
        &path,
        serde_json::json!({
            "cpu": {"quota": 90000, "period": 100000, "shares": 512},
            "pids": {"limit": 40},
            "memory": {"limit": 67108864}
        }),
    );
    let _cleanup = Cleanup(&k, "cg1");
    let o = k.run(&["create", "--bundle", bundle.to_str().unwrap(), "cg1"]);
    assert!(o.status.success(), "create: {}", stderr(&o));
    let state = k.state("cg1").expect("state");
    eprintln!(
        "backend used for cg1: {}",
        state["annotations"]["io.kiln.backend"]
    );
    let shim = state["pid"].as_i64().expect("shim pid") as i32;
    let vm_procs = children(shim);
    assert!(!vm_procs.is_empty(), "the shim {shim} has no VMM child");
    eprintln!("shim {shim}, VM processes {vm_procs:?}, cgroup {path}");

    // Every VM process is in the cgroup in every hierarchy, as the kernel reports it.
    let dirs = cgroup_dirs(&path);
    for pid in std::iter::once(shim).chain(vm_procs.iter().copied()) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for line in text.lines() {
            let cg = line.splitn(3, ':').nth(2).unwrap_or_default();
            assert_eq!(cg, path, "pid {pid}: {line}");
        }
        for (dir, _, _) in &dirs {
            let procs = read(dir, "cgroup.procs");
            assert!(
                procs.lines().any(|l| l == pid.to_string()),
                "pid {pid} not in {}/cgroup.procs: {procs}",
                dir.display()
            );
        }
    }

    // The host limits.
    let pids_max = (40 + HOST_PIDS_OVERHEAD).to_string();
    // 64 MiB limit: a 128 MiB VM (the minimum) + the VMM's overhead.
    let memory_max = ((128 + VMM_MEMORY_OVERHEAD_MIB) << 20).to_string();
    let pure_v2 = dirs.iter().all(|(_, v2, _)| *v2);
    let mut checked = 0;
    for (dir, v2, controllers) in &dirs {
        let has = |c: &str| controllers.iter().any(|x| x == c);
        if *v2 && pure_v2 {
            assert_eq!(read(dir, "cpu.max"), "90000 100000");
            assert_eq!(read(dir, "cpu.weight"), "20");
            assert_eq!(read(dir, "pids.max"), pids_max);
            assert_eq!(read(dir, "memory.max"), memory_max);
            checked += 4;
        }
        if has("cpu") {
            assert_eq!(read(dir, "cpu.cfs_quota_us"), "90000");
            assert_eq!(read(dir, "cpu.cfs_period_us"), "100000");
            assert_eq!(read(dir, "cpu.shares"), "512");
            checked += 3;
        }
        if has("pids") {
            assert_eq!(read(dir, "pids.max"), pids_max);
            checked += 1;
        }
        if has("memory") {
            assert_eq!(read(dir, "memory.limit_in_bytes"), memory_max);
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "no cpu/pids/memory controller found: {dirs:?}"
    );

    // ps lists the shim and the VM processes.
    let o = k.run(&["ps", "--format", "json", "cg1"]);
    let ps: Vec<i32> = serde_json::from_slice(&o.stdout).unwrap();
    for pid in std::iter::once(shim).chain(vm_procs.iter().copied()) {
        assert!(ps.contains(&pid), "ps {ps:?} lacks {pid}");
    }

    // The container runs: start, then SIGKILL and delete remove the cgroup and its parent.
    assert!(k.run(&["start", "cg1"]).status.success());
    assert!(k.wait_status("cg1", "running", Duration::from_secs(30)));
    assert!(k.run(&["kill", "cg1", "KILL"]).status.success());
    assert!(k.wait_status("cg1", "stopped", Duration::from_secs(60)));
    let o = k.run(&["delete", "cg1"]);
    assert!(o.status.success(), "delete: {}", stderr(&o));
    for (dir, _, _) in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(
            !dir.parent().unwrap().exists(),
            "{} (made by kiln) left behind",
            dir.parent().unwrap().display()
        );
    }
}

#[test]
fn runtime_cgroups_default_path_is_per_root() {
    if !kiln_tests::require_kvm("runtime_cgroups_default_path_is_per_root") {
        return;
    }
    // Two roots, the same id, no cgroupsPath: two distinct cgroups under /kiln.
    let (k1, k2) = (Kiln::new("rt-cgroups-d1"), Kiln::new("rt-cgroups-d2"));
    let _c1 = Cleanup(&k1, "same");
    let _c2 = Cleanup(&k2, "same");
    let mut paths = Vec::new();
    for k in [&k1, &k2] {
        let bundle = k.bundle("b", &["sleep", "1000"]);
        let o = k.run(&["create", "--bundle", bundle.to_str().unwrap(), "same"]);
        assert!(o.status.success(), "create: {}", stderr(&o));
        let shim = k.state("same").expect("state")["pid"].as_i64().unwrap();
        let text = std::fs::read_to_string(format!("/proc/{shim}/cgroup")).unwrap();
        let path = text
            .lines()
            .find(|l| l.contains(":pids:") || l.starts_with("0::"))
            .and_then(|l| l.splitn(3, ':').nth(2))
            .unwrap()
            .to_string();
        assert!(path.starts_with("/kiln/same-"), "{path}");
        paths.push(path);
    }
    assert_ne!(paths[0], paths[1]);
    for (k, path) in [(&k1, &paths[0]), (&k2, &paths[1])] {
        let o = k.run(&["delete", "--force", "same"]);
        assert!(o.status.success(), "delete: {}", stderr(&o));
        for (dir, _, _) in cgroup_dirs(path) {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}

#[test]
fn runtime_cgroups_refuses_an_invalid_path() {
    let k = Kiln::new("rt-cgroups-bad");
    let bundle = k.bundle("b", &["true"]);
    set_cgroup(&bundle, "/a/../b", serde_json::json!({}));
    let o = k.run(&["create", "--bundle", bundle.to_str().unwrap(), "bad"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("config.json: invalid linux.cgroupsPath") && err.contains("/a/../b"),
        "{err}"
    );
    assert!(!k.root.join("bad").exists(), "state left behind");
}
