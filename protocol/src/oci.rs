//! Conversion from an OCI runtime spec (`oci_spec::runtime::Spec`) to [`ContainerSpec`]
//! (feature `oci`).
//!
//! Lives here rather than in the runtime so `host-vmm --`, the runtime and tests build the same
//! spec the same way. The conversion follows runc where OCI and cgroup v2 differ: `cpu.shares`
//! becomes `cpu.weight` ([`shares_to_weight`]), `memory.swap` (memory + swap) becomes
//! `memory.swap.max` (swap only), negative or zero limits mean "no limit".
//!
//! What the guest cannot know is left to the caller: the guest location of the root filesystem
//! ([`RootSpec`]; OCI's `root.path` is a host path). Everything the VM cannot honour or that
//! belongs to the host (hooks, devices, apparmor/selinux, rootfs propagation) is not carried.
//! `linux.seccomp` is carried ([`ContainerSpec::seccomp`]) with its enums as OCI strings; a
//! profile over the limits of [`crate::spec`] (`MAX_SECCOMP_*`) is refused here, and the agent
//! checks it again.

use std::path::Path;

use oci_spec::runtime::{self as oci, Capabilities as OciCapabilities};
use thiserror::Error;

use crate::spec::{
    shares_to_weight, Capabilities, ContainerSpec, IdMapping, LinuxSpec, MountSpec, Namespace,
    NamespaceKind, ProcessSpec, Resources, Rlimit, RootSpec, SeccompArg, SeccompProfile,
    SeccompSyscall, TtySize, User, MAX_SECCOMP_ARGS, MAX_SECCOMP_NAMES, MAX_SECCOMP_RULES,
};

/// Why an OCI spec could not be converted.
#[derive(Debug, Error)]
pub enum OciConversionError {
    /// The spec has no `process`.
    #[error("the OCI spec has no process")]
    MissingProcess,
    /// `process.args` is missing or empty.
    #[error("process.args is empty")]
    EmptyArgs,
    /// A path that is not valid UTF-8.
    #[error("{field} is not valid UTF-8: {path:?}")]
    NonUtf8Path {
        /// Which field.
        field: &'static str,
        /// The path, lossily printed.
        path: String,
    },
    /// `linux.seccomp` is larger than the agent accepts.
    #[error("linux.seccomp: {0}")]
    SeccompTooLarge(String),
}

/// Converts an OCI spec. `root` says where the root filesystem is in the guest; its `readonly`
/// is replaced by OCI's `root.readonly` when the spec sets it.
pub fn container_spec_from_oci(
    spec: &oci::Spec,
    root: RootSpec,
) -> Result<ContainerSpec, OciConversionError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or(OciConversionError::MissingProcess)?;
    let mut root = root;
    if let Some(readonly) = spec.root().as_ref().and_then(|r| r.readonly()) {
        root.readonly = readonly;
    }
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(mount_from_oci)
        .collect::<Result<_, _>>()?;
    let linux = match spec.linux() {
        Some(linux) => linux_from_oci(linux)?,
        None => LinuxSpec::default(),
    };
    Ok(ContainerSpec {
        process: process_from_oci(process)?,
        root,
        hostname: spec.hostname().clone(),
        mounts,
        linux,
        seccomp: spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().as_ref())
            .map(seccomp_from_oci)
            .transpose()?,
    })
}

/// Converts `linux.seccomp`, refusing a profile over the `MAX_SECCOMP_*` limits.
pub fn seccomp_from_oci(s: &oci::LinuxSeccomp) -> Result<SeccompProfile, OciConversionError> {
    let syscalls = s.syscalls().as_deref().unwrap_or_default();
    if syscalls.len() > MAX_SECCOMP_RULES {
        return Err(OciConversionError::SeccompTooLarge(format!(
            "{} syscalls entries, at most {MAX_SECCOMP_RULES}",
            syscalls.len()
        )));
    }
    let names: usize = syscalls.iter().map(|r| r.names().len()).sum();
    if names > MAX_SECCOMP_NAMES {
        return Err(OciConversionError::SeccompTooLarge(format!(
            "{names} syscall names, at most {MAX_SECCOMP_NAMES}"
        )));
    }
    let mut rules = Vec::with_capacity(syscalls.len());
    for (i, r) in syscalls.iter().enumerate() {
        let args = r.args().as_deref().unwrap_or_default();
        if args.len() > MAX_SECCOMP_ARGS {
            return Err(OciConversionError::SeccompTooLarge(format!(
                "syscalls[{i}] has {} args conditions, at most {MAX_SECCOMP_ARGS}",
                args.len()
            )));
        }
        rules.push(SeccompSyscall {
            names: r.names().clone(),
            action: r.action().to_string(),
            errno_ret: r.errno_ret(),
            args: args
                .iter()
                .map(|a| SeccompArg {
                    index: u32::try_from(a.index()).unwrap_or(u32::MAX),
                    value: a.value(),
                    value_two: a.value_two().unwrap_or(0),
                    op: a.op().to_string(),
                })
                .collect(),
        });
    }
    Ok(SeccompProfile {
        default_action: s.default_action().to_string(),
        default_errno_ret: s.default_errno_ret(),
        architectures: s
            .architectures()
            .iter()
            .flatten()
            .map(|a| a.to_string())
            .collect(),
        flags: s.flags().iter().flatten().map(|f| f.to_string()).collect(),
        syscalls: rules,
    })
}

/// Converts an OCI `process` (also what `runc exec --process` reads).
pub fn process_from_oci(process: &oci::Process) -> Result<ProcessSpec, OciConversionError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(OciConversionError::EmptyArgs);
    }
    let user = process.user();
    Ok(ProcessSpec {
        args,
        env: process.env().clone().unwrap_or_default(),
        cwd: utf8("process.cwd", process.cwd())?,
        user: User {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
        },
        terminal: process.terminal().unwrap_or(false),
        console_size: process.console_size().map(|b| TtySize {
            rows: u16::try_from(b.height()).unwrap_or(u16::MAX),
            cols: u16::try_from(b.width()).unwrap_or(u16::MAX),
        }),
        rlimits: process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                kind: r.typ().to_string(),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        capabilities: process.capabilities().as_ref().map(|c| Capabilities {
            bounding: cap_names(c.bounding()),
            effective: cap_names(c.effective()),
            inheritable: cap_names(c.inheritable()),
            permitted: cap_names(c.permitted()),
            ambient: cap_names(c.ambient()),
        }),
        oom_score_adj: process.oom_score_adj(),
    })
}

/// Capability names with the `CAP_` prefix, sorted (OCI sets are unordered).
fn cap_names(set: &Option<OciCapabilities>) -> Vec<String> {
    let mut names: Vec<String> = set
        .iter()
        .flatten()
        .map(|c| {
            let name = c.to_string();
            if name.starts_with("CAP_") {
                name
            } else {
                format!("CAP_{name}")
            }
        })
        .collect();
    names.sort();
    names
}

fn mount_from_oci(mount: &oci::Mount) -> Result<MountSpec, OciConversionError> {
    Ok(MountSpec {
        destination: utf8("mounts[].destination", mount.destination())?,
        fstype: mount.typ().clone(),
        source: mount
            .source()
            .as_deref()
            .map(|s| utf8("mounts[].source", s))
            .transpose()?,
        options: mount.options().clone().unwrap_or_default(),
    })
}

fn linux_from_oci(linux: &oci::Linux) -> Result<LinuxSpec, OciConversionError> {
    let namespaces = linux
        .namespaces()
        .iter()
        .flatten()
        .map(|ns| {
            Ok(Namespace {
                kind: namespace_kind(ns.typ()),
                path: ns
                    .path()
                    .as_deref()
                    .map(|p| utf8("linux.namespaces[].path", p))
                    .transpose()?,
            })
        })
        .collect::<Result<_, OciConversionError>>()?;
    let mappings = |m: &Option<Vec<oci::LinuxIdMapping>>| -> Vec<IdMapping> {
        m.iter()
            .flatten()
            .map(|m| IdMapping {
                container_id: m.container_id(),
                host_id: m.host_id(),
                size: m.size(),
            })
            .collect()
    };
    Ok(LinuxSpec {
        namespaces,
        uid_mappings: mappings(linux.uid_mappings()),
        gid_mappings: mappings(linux.gid_mappings()),
        resources: linux
            .resources()
            .as_ref()
            .map(resources_from_oci)
            .unwrap_or_default(),
        cgroups_path: linux
            .cgroups_path()
            .as_deref()
            .map(|p| utf8("linux.cgroupsPath", p))
            .transpose()?,
        sysctl: linux
            .sysctl()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        masked_paths: linux.masked_paths().clone().unwrap_or_default(),
        readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
    })
}

fn namespace_kind(typ: oci::LinuxNamespaceType) -> NamespaceKind {
    match typ {
        oci::LinuxNamespaceType::Mount => NamespaceKind::Mount,
        oci::LinuxNamespaceType::Cgroup => NamespaceKind::Cgroup,
        oci::LinuxNamespaceType::Uts => NamespaceKind::Uts,
        oci::LinuxNamespaceType::Ipc => NamespaceKind::Ipc,
        oci::LinuxNamespaceType::User => NamespaceKind::User,
        oci::LinuxNamespaceType::Pid => NamespaceKind::Pid,
        oci::LinuxNamespaceType::Network => NamespaceKind::Network,
        oci::LinuxNamespaceType::Time => NamespaceKind::Time,
    }
}

fn resources_from_oci(r: &oci::LinuxResources) -> Resources {
    let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|&v| v > 0);
    let memory = r.memory().as_ref();
    let memory_limit = positive(memory.and_then(|m| m.limit()));
    // OCI `swap` is memory + swap; cgroup v2 `memory.swap.max` is swap alone (as runc).
    let memory_swap_limit = positive(memory.and_then(|m| m.swap()))
        .map(|total| total.saturating_sub(memory_limit.unwrap_or(0)));
    let cpu = r.cpu().as_ref();
    Resources {
        memory_limit,
        memory_swap_limit,
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        cpu_weight: cpu.and_then(|c| c.shares()).map(shares_to_weight),
        cpuset_cpus: cpu.and_then(|c| c.cpus().clone()),
        cpuset_mems: cpu.and_then(|c| c.mems().clone()),
        pids_limit: positive(r.pids().map(|p| p.limit())),
    }
}

fn utf8(field: &'static str, path: &Path) -> Result<String, OciConversionError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| OciConversionError::NonUtf8Path {
            field,
            path: path.to_string_lossy().into_owned(),
        })
}
