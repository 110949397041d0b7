//! OCI runtime spec → ContainerSpec conversion (feature `oci`, enabled for tests by the crate's
//! dev-dependency on itself).

use kiln_protocol::oci::{container_spec_from_oci, OciConversionError};
use kiln_protocol::{NamespaceKind, RootSpec, TtySize};
use oci_spec::runtime::Spec;

const CONFIG: &str = r#"{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": true,
    "consoleSize": {"height": 40, "width": 120},
    "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 18},
    "args": ["/bin/sh", "-c", "echo hi"],
    "env": ["PATH=/bin", "A=b"],
    "cwd": "/work",
    "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"]},
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 2048, "soft": 1024}],
    "noNewPrivileges": true,
    "oomScoreAdj": 100
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "box",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=1777"]}
  ],
  "linux": {
    "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/run/netns/x"}],
    "resources": {
      "memory": {"limit": 67108864, "swap": 100663296},
      "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
      "pids": {"limit": 64}
    },
    "sysctl": {"net.ipv4.ip_forward": "1"},
    "maskedPaths": ["/proc/kcore"],
    "readonlyPaths": ["/proc/sys"]
  }
}"#;

#[test]
fn converts_a_typical_config() {
    let spec: Spec = serde_json::from_str(CONFIG).unwrap();
    let root = RootSpec {
        device: Some("/dev/vdb".into()),
        fstype: "ext4".into(),
        path: "/run/kiln/c/rootfs".into(),
        readonly: false,
    };
    let c = container_spec_from_oci(&spec, root).unwrap();
    let p = &c.process;
    assert_eq!(p.args, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(p.env, ["PATH=/bin", "A=b"]);
    assert_eq!(p.cwd, "/work");
    assert_eq!((p.user.uid, p.user.gid), (1000, 100));
    assert_eq!(p.user.additional_gids, [5, 6]);
    assert_eq!(p.user.umask, Some(18));
    assert!(p.terminal && p.no_new_privileges);
    assert_eq!(
        p.console_size,
        Some(TtySize {
            rows: 40,
            cols: 120
        })
    );
    assert_eq!(p.rlimits.len(), 1);
    assert_eq!(p.rlimits[0].kind, "RLIMIT_NOFILE");
    assert_eq!((p.rlimits[0].soft, p.rlimits[0].hard), (1024, 2048));
    let caps = p.capabilities.as_ref().unwrap();
    assert_eq!(caps.bounding, ["CAP_CHOWN", "CAP_KILL"]);
    assert!(caps.ambient.is_empty());
    assert_eq!(p.oom_score_adj, Some(100));

    assert!(c.root.readonly, "root.readonly comes from the OCI spec");
    assert_eq!(c.root.path, "/run/kiln/c/rootfs");
    assert_eq!(c.hostname.as_deref(), Some("box"));
    assert_eq!(c.mounts.len(), 2);
    assert_eq!(c.mounts[1].destination, "/tmp");
    assert_eq!(c.mounts[1].fstype.as_deref(), Some("tmpfs"));
    assert_eq!(c.mounts[1].options, ["nosuid", "mode=1777"]);

    let l = &c.linux;
    let kinds: Vec<_> = l.namespaces.iter().map(|n| n.kind).collect();
    assert_eq!(
        kinds,
        [
            NamespaceKind::Pid,
            NamespaceKind::Mount,
            NamespaceKind::Network
        ]
    );
    assert_eq!(l.namespaces[2].path.as_deref(), Some("/run/netns/x"));
    assert_eq!(l.resources.memory_limit, Some(64 << 20));
    assert_eq!(l.resources.memory_swap_limit, Some(32 << 20));
    assert_eq!(l.resources.cpu_quota, Some(50_000));
    assert_eq!(l.resources.cpu_period, Some(100_000));
    assert_eq!(l.resources.cpu_weight, Some(39));
    assert_eq!(l.resources.cpuset_cpus.as_deref(), Some("0"));
    assert_eq!(l.resources.pids_limit, Some(64));
    assert_eq!(
        l.sysctl.get("net.ipv4.ip_forward").map(String::as_str),
        Some("1")
    );
    assert_eq!(l.masked_paths, ["/proc/kcore"]);
    assert_eq!(l.readonly_paths, ["/proc/sys"]);
    // The result encodes into a frame.
    kiln_protocol::encode_frame(&c).unwrap();
}

#[test]
fn unlimited_values_become_none_and_missing_parts_are_errors() {
    let spec: Spec = serde_json::from_str(
        r#"{"ociVersion": "1.0.2", "process": {"user": {"uid": 0, "gid": 0}, "args": ["true"], "cwd": "/"},
            "linux": {"resources": {"memory": {"limit": -1}, "pids": {"limit": -1}}}}"#,
    )
    .unwrap();
    let c = container_spec_from_oci(&spec, RootSpec::default()).unwrap();
    assert_eq!(c.linux.resources.memory_limit, None);
    assert_eq!(c.linux.resources.pids_limit, None);
    assert!(!c.process.terminal);

    let no_args: Spec = serde_json::from_str(
        r#"{"ociVersion": "1.0.2", "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/"}}"#,
    )
    .unwrap();
    assert!(matches!(
        container_spec_from_oci(&no_args, RootSpec::default()),
        Err(OciConversionError::EmptyArgs)
    ));
    let no_process: Spec = serde_json::from_str(r#"{"ociVersion": "1.0.2"}"#).unwrap();
    assert!(matches!(
        container_spec_from_oci(&no_process, RootSpec::default()),
        Err(OciConversionError::MissingProcess)
    ));
}

#[test]
fn converts_seccomp_with_oci_strings_and_refuses_oversized_profiles() {
    let mut spec: Spec = serde_json::from_str(CONFIG).unwrap();
    let seccomp = r#"{
      "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
      "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
      "flags": ["SECCOMP_FILTER_FLAG_LOG"],
      "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
      ]
    }"#;
    let mut linux = spec.linux().clone().unwrap();
    linux.set_seccomp(Some(serde_json::from_str(seccomp).unwrap()));
    spec.set_linux(Some(linux.clone()));
    let s = container_spec_from_oci(&spec, RootSpec::default())
        .unwrap()
        .seccomp
        .unwrap();
    assert_eq!(s.default_action, "SCMP_ACT_ERRNO");
    assert_eq!(s.default_errno_ret, Some(38));
    assert_eq!(s.architectures, ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]);
    assert_eq!(s.flags, ["SECCOMP_FILTER_FLAG_LOG"]);
    assert_eq!(s.syscalls.len(), 3);
    assert_eq!(s.syscalls[0].names, ["read", "write"]);
    assert_eq!(s.syscalls[1].args[0].op, "SCMP_CMP_MASKED_EQ");
    assert_eq!(s.syscalls[1].args[0].value, 8);
    assert_eq!(s.syscalls[2].errno_ret, Some(1));

    // Over MAX_SECCOMP_NAMES names in all: refused with a message naming the limit.
    let names: Vec<String> = (0..kiln_protocol::MAX_SECCOMP_NAMES + 1)
        .map(|i| format!("\"s{i}\""))
        .collect();
    let big = format!(
        r#"{{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{{"names": [{}], "action": "SCMP_ACT_ERRNO"}}]}}"#,
        names.join(",")
    );
    linux.set_seccomp(Some(serde_json::from_str(&big).unwrap()));
    spec.set_linux(Some(linux));
    let err = container_spec_from_oci(&spec, RootSpec::default()).unwrap_err();
    assert!(
        matches!(err, OciConversionError::SeccompTooLarge(_)),
        "{err}"
    );
    assert!(err.to_string().contains("at most 4096"), "{err}");
}
