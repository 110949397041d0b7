//! The container description sent with `CreateContainer` and `ExecProcess`.
//!
//! A self-contained subset of the OCI runtime spec: everything guest-init needs to set up and run
//! a container, and nothing that only makes sense on the host (hooks, the bundle path, host-side
//! annotations). The host (the `kiln` runtime or `host-vmm --`) builds it; with the `oci` feature
//! `crate::oci` converts an `oci_spec::runtime::Spec`.
//!
//! This module owns only data. Validation of untrusted values (paths, limits) is the agent's job.
//!
//! Wire compatibility: bincode encodes struct fields in order with no names, so the field list of
//! every struct here is frozen for protocol major version 1. New information goes into new enum
//! variants (appended at the end) or a new major version. [`ContainerSpec::seccomp`] is the one
//! field outside the frozen layout: binary formats (bincode, the wire) never see it, and it
//! travels in its own request variant (`Request::CreateContainerSeccomp`, protocol 1.2), which
//! the client picks when it is set; human-readable formats (the runtime's JSON hand-over to its
//! shim) carry it as an optional `seccomp` key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the agent needs to create one container.
///
/// Serialized by hand (see `ContainerSpecWire`): binary formats get the frozen five fields,
/// human-readable ones also `seccomp`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    /// The container's main process (`process` in OCI).
    pub process: ProcessSpec,
    /// The container's root filesystem (`root` in OCI, plus where it comes from in the guest).
    pub root: RootSpec,
    /// `hostname` in OCI; `None` leaves the UTS namespace's name unchanged.
    pub hostname: Option<String>,
    /// `mounts` in OCI, in order, applied inside the new root before `pivot_root`.
    pub mounts: Vec<MountSpec>,
    /// `linux` in OCI: namespaces, resources, sysctl, masked and read-only paths.
    pub linux: LinuxSpec,
    /// `linux.seccomp` in OCI. Not part of `ContainerSpec`'s (frozen) wire layout: binary
    /// serializers skip it, and [`crate::AgentClient::create_container`] sends it in
    /// `Request::CreateContainerSeccomp` (protocol 1.2) when it is set. Exec'd processes get the
    /// container's profile, as with runc.
    pub seccomp: Option<SeccompProfile>,
}

/// The frozen wire layout of [`ContainerSpec`] (protocol 1.0), borrowed for serializing.
#[derive(Serialize)]
#[serde(rename = "ContainerSpec")]
struct ContainerSpecWire<'a> {
    process: &'a ProcessSpec,
    root: &'a RootSpec,
    hostname: &'a Option<String>,
    mounts: &'a Vec<MountSpec>,
    linux: &'a LinuxSpec,
}

/// The frozen wire layout, owned for deserializing.
#[derive(Deserialize)]
#[serde(rename = "ContainerSpec")]
struct ContainerSpecWireOwned {
    process: ProcessSpec,
    root: RootSpec,
    hostname: Option<String>,
    mounts: Vec<MountSpec>,
    linux: LinuxSpec,
}

/// The human-readable form: the wire fields plus an optional `seccomp` key.
#[derive(Serialize)]
#[serde(rename = "ContainerSpec")]
struct ContainerSpecText<'a> {
    process: &'a ProcessSpec,
    root: &'a RootSpec,
    hostname: &'a Option<String>,
    mounts: &'a Vec<MountSpec>,
    linux: &'a LinuxSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    seccomp: &'a Option<SeccompProfile>,
}

#[derive(Deserialize)]
#[serde(rename = "ContainerSpec")]
struct ContainerSpecTextOwned {
    process: ProcessSpec,
    root: RootSpec,
    hostname: Option<String>,
    mounts: Vec<MountSpec>,
    linux: LinuxSpec,
    #[serde(default)]
    seccomp: Option<SeccompProfile>,
}

impl Serialize for ContainerSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            ContainerSpecText {
                process: &self.process,
                root: &self.root,
                hostname: &self.hostname,
                mounts: &self.mounts,
                linux: &self.linux,
                seccomp: &self.seccomp,
            }
            .serialize(serializer)
        } else {
            ContainerSpecWire {
                process: &self.process,
                root: &self.root,
                hostname: &self.hostname,
                mounts: &self.mounts,
                linux: &self.linux,
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for ContainerSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let t = ContainerSpecTextOwned::deserialize(deserializer)?;
            Ok(ContainerSpec {
                process: t.process,
                root: t.root,
                hostname: t.hostname,
                mounts: t.mounts,
                linux: t.linux,
                seccomp: t.seccomp,
            })
        } else {
            let w = ContainerSpecWireOwned::deserialize(deserializer)?;
            Ok(ContainerSpec {
                process: w.process,
                root: w.root,
                hostname: w.hostname,
                mounts: w.mounts,
                linux: w.linux,
                seccomp: None,
            })
        }
    }
}

/// Most `syscalls` entries a [`SeccompProfile`] may have (podman's default profile has ~30).
pub const MAX_SECCOMP_RULES: usize = 1024;
/// Most syscall names over all entries of a [`SeccompProfile`] (podman's default: ~380).
pub const MAX_SECCOMP_NAMES: usize = 4096;
/// Most argument conditions of one `syscalls` entry (a system call has 6 arguments).
pub const MAX_SECCOMP_ARGS: usize = 6;
/// Longest syscall, action, operator, architecture or flag name accepted.
pub const MAX_SECCOMP_NAME_LEN: usize = 64;

/// `linux.seccomp` of OCI, with the enums as their OCI strings (`SCMP_ACT_ERRNO`,
/// `SCMP_CMP_MASKED_EQ`, `SCMP_ARCH_X86_64`, `SECCOMP_FILTER_FLAG_LOG`): the agent parses and
/// checks them, so an unknown value is an error naming it rather than a decode failure.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SeccompProfile {
    /// `defaultAction`, e.g. `SCMP_ACT_ERRNO`.
    pub default_action: String,
    /// `defaultErrnoRet`: errno of an `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE` default (EPERM if unset).
    pub default_errno_ret: Option<u32>,
    /// `architectures`, e.g. `SCMP_ARCH_X86_64`; only x86_64 matters to the guest.
    pub architectures: Vec<String>,
    /// `flags`, e.g. `SECCOMP_FILTER_FLAG_LOG`.
    pub flags: Vec<String>,
    /// `syscalls`, in order.
    pub syscalls: Vec<SeccompSyscall>,
}

/// One `linux.seccomp.syscalls` entry: an action for a set of system calls, optionally only when
/// all argument conditions hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SeccompSyscall {
    /// `names` of system calls.
    pub names: Vec<String>,
    /// `action`, e.g. `SCMP_ACT_ALLOW`.
    pub action: String,
    /// `errnoRet` for `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE` (EPERM if unset).
    pub errno_ret: Option<u32>,
    /// `args`: all must hold.
    pub args: Vec<SeccompArg>,
}

/// One argument condition of a [`SeccompSyscall`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SeccompArg {
    /// Argument index, 0..=5.
    pub index: u32,
    /// `value` (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// `valueTwo` (the value compared after masking for `SCMP_CMP_MASKED_EQ`; 0 if unset).
    pub value_two: u64,
    /// `op`, e.g. `SCMP_CMP_EQ`.
    pub op: String,
}

/// A process to run: the container's main process or an exec'd one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// `args`: `args[0]` is the program, looked up in `PATH` from `env` if it has no `/`.
    pub args: Vec<String>,
    /// `env`: `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// `cwd`: absolute path inside the container.
    pub cwd: String,
    /// `user`: uid, gid, additional gids, umask.
    pub user: User,
    /// `terminal`: run the process on a pty (stdio stream [`crate::StdioStream::Pty`]).
    pub terminal: bool,
    /// `consoleSize`: initial pty size when `terminal` is set.
    pub console_size: Option<TtySize>,
    /// `rlimits`, applied with `setrlimit` before exec.
    pub rlimits: Vec<Rlimit>,
    /// `noNewPrivileges`: `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// `capabilities`; `None` keeps the agent's default set for containers.
    pub capabilities: Option<Capabilities>,
    /// `oomScoreAdj`.
    pub oom_score_adj: Option<i32>,
}

/// `process.user` of OCI.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct User {
    /// Numeric user id inside the container.
    pub uid: u32,
    /// Numeric primary group id inside the container.
    pub gid: u32,
    /// Supplementary group ids (`additionalGids`).
    pub additional_gids: Vec<u32>,
    /// `umask`; `None` keeps the agent's default (0o022).
    pub umask: Option<u32>,
}

/// Size of a terminal in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TtySize {
    /// Rows (`height` in OCI's `consoleSize`).
    pub rows: u16,
    /// Columns (`width` in OCI's `consoleSize`).
    pub cols: u16,
}

/// One `process.rlimits` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// OCI name of the limit, e.g. `RLIMIT_NOFILE`.
    pub kind: String,
    /// Soft limit (`u64::MAX` = unlimited).
    pub soft: u64,
    /// Hard limit (`u64::MAX` = unlimited).
    pub hard: u64,
}

/// `process.capabilities`: capability names such as `CAP_CHOWN`, per set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Vec<String>,
    /// Effective set.
    pub effective: Vec<String>,
    /// Inheritable set.
    pub inheritable: Vec<String>,
    /// Permitted set.
    pub permitted: Vec<String>,
    /// Ambient set.
    pub ambient: Vec<String>,
}

/// Where the container's root filesystem is in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RootSpec {
    /// A guest block device holding the root filesystem (e.g. `/dev/vdb`) that the agent mounts
    /// at `path`; `None` when `path` already is a directory in the guest.
    pub device: Option<String>,
    /// Filesystem type of `device` (e.g. `ext4`, `erofs`); ignored when `device` is `None`.
    pub fstype: String,
    /// Guest directory that becomes the container's `/` (`root.path`).
    pub path: String,
    /// `root.readonly`: the root is remounted read-only after the mounts are applied.
    pub readonly: bool,
}

/// One OCI `mounts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MountSpec {
    /// Absolute path inside the container.
    pub destination: String,
    /// Filesystem type (`type` in OCI): `proc`, `tmpfs`, `bind`, ...; `None` for bind mounts
    /// given by options only.
    pub fstype: Option<String>,
    /// Source: a device, a guest path for bind mounts, or a name such as `tmpfs`.
    pub source: Option<String>,
    /// Mount options as in OCI / mount(8): `nosuid`, `ro`, `rbind`, `mode=755`, ...
    pub options: Vec<String>,
}

/// The `linux` section of OCI, trimmed to what guest-init applies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LinuxSpec {
    /// Namespaces to create (or join when `path` is set).
    pub namespaces: Vec<Namespace>,
    /// `uidMappings` for a user namespace.
    pub uid_mappings: Vec<IdMapping>,
    /// `gidMappings` for a user namespace.
    pub gid_mappings: Vec<IdMapping>,
    /// cgroup v2 limits (`linux.resources`).
    pub resources: Resources,
    /// `cgroupsPath`; `None` lets the agent choose one per container.
    pub cgroups_path: Option<String>,
    /// `sysctl`: key (dotted, e.g. `net.ipv4.ip_forward`) to value. Sorted, so encoding is
    /// deterministic.
    pub sysctl: BTreeMap<String, String>,
    /// `maskedPaths`: bind-mounted over with `/dev/null` (files) or an empty read-only tmpfs.
    pub masked_paths: Vec<String>,
    /// `readonlyPaths`: remounted read-only.
    pub readonly_paths: Vec<String>,
}

/// One namespace of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Which namespace.
    pub kind: NamespaceKind,
    /// Join the namespace at this guest path instead of creating a new one.
    pub path: Option<String>,
}

/// Linux namespace types (OCI `linux.namespaces[].type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NamespaceKind {
    /// `pid`
    Pid,
    /// `network`
    Network,
    /// `mount`
    Mount,
    /// `ipc`
    Ipc,
    /// `uts`
    Uts,
    /// `user`
    User,
    /// `cgroup`
    Cgroup,
    /// `time`
    Time,
}

/// One uid/gid mapping line of a user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    /// First id inside the container.
    pub container_id: u32,
    /// First id outside (in the guest's initial namespace).
    pub host_id: u32,
    /// Number of ids mapped.
    pub size: u32,
}

/// cgroup v2 resource limits. `None` everywhere means "no limit / kernel default".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// `memory.max` in bytes (OCI `memory.limit`; a negative OCI value becomes `None`).
    pub memory_limit: Option<u64>,
    /// `memory.swap.max` in bytes (OCI `memory.swap` minus `memory.limit`, as runc does).
    pub memory_swap_limit: Option<u64>,
    /// CPU quota per period in microseconds (`cpu.max` first field; OCI `cpu.quota`).
    pub cpu_quota: Option<i64>,
    /// CPU period in microseconds (`cpu.max` second field; OCI `cpu.period`).
    pub cpu_period: Option<u64>,
    /// `cpu.weight` (1..=10000), converted from OCI `cpu.shares` with [`shares_to_weight`].
    pub cpu_weight: Option<u64>,
    /// `cpuset.cpus` (e.g. `0-1`).
    pub cpuset_cpus: Option<String>,
    /// `cpuset.mems`.
    pub cpuset_mems: Option<String>,
    /// `pids.max` (OCI `pids.limit`; zero or negative becomes `None`, as runc does).
    pub pids_limit: Option<u64>,
}

/// Converts cgroup v1 `cpu.shares` (2..=262144) to cgroup v2 `cpu.weight` (1..=10000) with the
/// linear formula runc and crun use, so the same OCI spec gets the same weight under kiln.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100; // unset shares: the cgroup v2 default weight
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_to_weight_matches_runc_formula() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        // runc maps the cgroup v1 default of 1024 shares to weight 39.
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
        assert_eq!(shares_to_weight(0), 100);
    }

    /// JSON (the runtime's hand-over to its shim) keeps the profile; no profile, no key.
    #[test]
    fn json_carries_seccomp_and_omits_it_when_unset() {
        let spec = ContainerSpec {
            seccomp: Some(SeccompProfile {
                default_action: "SCMP_ACT_ALLOW".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"seccomp\":{\"default_action\":\"SCMP_ACT_ALLOW\""));
        assert_eq!(serde_json::from_str::<ContainerSpec>(&json).unwrap(), spec);
        let plain = serde_json::to_string(&ContainerSpec::default()).unwrap();
        assert!(!plain.contains("seccomp"), "{plain}");
        assert_eq!(
            serde_json::from_str::<ContainerSpec>(&plain).unwrap(),
            ContainerSpec::default()
        );
    }
}
