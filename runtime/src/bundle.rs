//! OCI bundles: reading `config.json`, checking what a microVM can honour, and turning the spec
//! into the agent's [`ContainerSpec`] plus the VM's size.
//!
//! The VM sees only block devices. A bind mount of a host *directory* becomes a [`HostBind`]:
//! `create` packs the directory into an ext4 image (a copy taken then; writes in the guest are
//! not written back), attaches it as an extra disk with serial `kiln-bind-<n>`, and the spec
//! tells the agent to mount `/dev/disk/by-id/virtio-kiln-bind-<n>` (ext4, `ro` or `rw` as the
//! bind's options say) at the destination. The few files container engines bind over every
//! container (`/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, `/run/.containerenv`) are
//! skipped with a warning (the image's own copies stay visible); `/dev/shm` binds become a guest
//! tmpfs, binds of the host's `/sys` or `/proc` (rootless engines) the guest's own sysfs or procfs;
//! other binds of single files (and of anything not a directory) are refused with an
//! error naming them. Namespace paths name host namespaces, which the guest cannot join: the
//! guest creates fresh namespaces of those kinds instead.

use std::path::{Path, PathBuf};

use kiln_protocol::oci::{container_spec_from_oci, OciConversionError};
use kiln_protocol::{ContainerSpec, MountSpec, RootSpec};
use oci_spec::runtime::Spec;
use thiserror::Error;

/// Where the container's files are inside the guest (the agent-layout image).
pub const GUEST_ROOT: &str = rootfs_builder::CONTAINER_ROOT;

/// Annotation choosing the VMM backend.
pub const ANNOTATION_VMM: &str = "io.kiln.vmm";
/// Annotation setting the VM's memory in MiB.
pub const ANNOTATION_MEMORY: &str = "io.kiln.vm.memory_mib";
/// Annotation setting the VM's vCPU count.
pub const ANNOTATION_VCPUS: &str = "io.kiln.vm.vcpus";

/// Guest memory kept free for the kernel and the agent on top of a memory limit (MiB).
const VM_OVERHEAD_MIB: u64 = 64;
/// Smallest VM kiln will size from a container limit (MiB).
const MIN_MEMORY_MIB: u64 = 128;
/// Largest VM kiln will size from a container limit (MiB).
const MAX_MEMORY_MIB: u64 = 64 * 1024;

/// Host pseudo file systems whose binds become the guest kernel's own instance.
const KERNEL_FS_BINDS: &[(&str, &str)] = &[("/sys", "sysfs"), ("/proc", "proc")];

/// Destinations of host file binds that engines add to every container and kiln skips.
const SKIPPED_FILE_BINDS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/run/.containerenv",
];

/// Source prefix naming a virtio disk by serial (guest-init's `spawn::plan::disk`).
pub const DISK_BY_SERIAL: &str = "/dev/disk/by-id/virtio-";
/// Most host directory binds per container (one extra disk each; host-vmm's `--drive` limit).
pub const MAX_HOST_BINDS: usize = crate::vm::MAX_DRIVES;
/// Options of a bind that carry over to the guest's ext4 mount; the rest (`bind`, `rbind`,
/// propagation, SELinux labels, ...) are host-side and dropped.
const CARRIED_OPTIONS: &[&str] = &[
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "sync",
    "async",
    "dirsync",
    "nosymfollow",
    "symfollow",
];

/// A bind mount of a host directory, carried into the VM as a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host directory (absolute; relative sources are taken from the bundle directory).
    pub source: PathBuf,
    /// Where it appears in the container.
    pub destination: String,
    /// Attach and mount read-only (`ro` in the bind's options).
    pub read_only: bool,
    /// The disk's serial, `kiln-bind-<n>`.
    pub serial: String,
}

/// Problems with a bundle.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The bundle directory is missing.
    #[error("bundle {path}: {source}")]
    Missing {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// config.json is missing or unreadable.
    #[error("{path}: cannot read: {source}")]
    ReadConfig {
        /// config.json.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// config.json is not a valid runtime spec.
    #[error("{path}: invalid runtime spec: {source}")]
    InvalidConfig {
        /// config.json.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The spec parses but lacks something or cannot be converted.
    #[error("{path}: {source}")]
    Convert {
        /// config.json.
        path: PathBuf,
        /// Why.
        #[source]
        source: OciConversionError,
    },
    /// A field kiln cannot honour.
    #[error("{path}: {problem}")]
    Unsupported {
        /// config.json.
        path: PathBuf,
        /// What.
        problem: String,
    },
    /// The root filesystem directory is missing.
    #[error("root filesystem {path}: {source}")]
    Rootfs {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// Absolute root filesystem directory.
    pub rootfs: PathBuf,
    /// The parsed config.json.
    pub spec: Spec,
}

/// How big the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
}

impl Bundle {
    /// Reads and checks `dir/config.json` and the root filesystem directory.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = std::fs::canonicalize(dir).map_err(|source| BundleError::Missing {
            path: dir.to_path_buf(),
            source,
        })?;
        let config = dir.join("config.json");
        let bytes = std::fs::read(&config).map_err(|source| BundleError::ReadConfig {
            path: config.clone(),
            source,
        })?;
        let spec: Spec =
            serde_json::from_slice(&bytes).map_err(|source| BundleError::InvalidConfig {
                path: config.clone(),
                source,
            })?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| BundleError::Unsupported {
                path: config.clone(),
                problem: "root.path is missing".into(),
            })?;
        let rootfs = dir.join(root);
        let meta = std::fs::metadata(&rootfs).map_err(|source| BundleError::Rootfs {
            path: rootfs.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(BundleError::Rootfs {
                path: rootfs,
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(Bundle { dir, rootfs, spec })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The annotations of the spec.
    pub fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        self.spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// The spec as the agent needs it. Host bind mounts become disk mounts, or are skipped or
    /// refused as the module documentation says; the disks to attach are in
    /// [`Bundle::container_spec_and_binds`].
    pub fn container_spec(&self) -> Result<ContainerSpec, BundleError> {
        self.container_spec_and_binds().map(|(spec, _)| spec)
    }

    /// [`Bundle::container_spec`] plus the host directories to pack and attach, in order.
    pub fn container_spec_and_binds(&self) -> Result<(ContainerSpec, Vec<HostBind>), BundleError> {
        let root = RootSpec {
            device: None,
            fstype: String::new(),
            path: GUEST_ROOT.into(),
            readonly: false,
        };
        let mut spec =
            container_spec_from_oci(&self.spec, root).map_err(|source| BundleError::Convert {
                path: self.config_path(),
                source,
            })?;
        let (mounts, binds) =
            guest_mounts(&spec.mounts, &self.dir).map_err(|problem| BundleError::Unsupported {
                path: self.config_path(),
                problem,
            })?;
        spec.mounts = mounts;
        for ns in &mut spec.linux.namespaces {
            if let Some(path) = ns.path.take() {
                log::debug!(
                    "{:?} namespace {path} is a host namespace: the guest creates a new one",
                    ns.kind
                );
            }
        }
        // The guest agent chooses the cgroup; cgroupsPath names a host cgroup.
        spec.linux.cgroups_path = None;
        Ok((spec, binds))
    }

    /// The VM size: annotations first, then the memory limit and CPU quota, then `defaults`.
    pub fn vm_size(&self, defaults: VmSize) -> Result<VmSize, BundleError> {
        let annotations = self.annotations();
        let number = |key: &str| -> Result<Option<u32>, BundleError> {
            annotations
                .get(key)
                .map(|v| {
                    v.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                        BundleError::Unsupported {
                            path: self.config_path(),
                            problem: format!("annotation {key}={v:?} is not a positive number"),
                        }
                    })
                })
                .transpose()
        };
        let resources = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone());
        let limit_mib = resources
            .as_ref()
            .and_then(|r| r.memory().as_ref().and_then(|m| m.limit()))
            .filter(|&l| l > 0)
            .map(|l| (l as u64).div_ceil(1 << 20));
        let memory_mib = match number(ANNOTATION_MEMORY)? {
            Some(m) => m,
            None => match limit_mib {
                Some(l) => (l + VM_OVERHEAD_MIB).clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB) as u32,
                None => defaults.memory_mib,
            },
        };
        let quota_cpus = resources.as_ref().and_then(|r| {
            let cpu = r.cpu().as_ref()?;
            let (quota, period) = (cpu.quota()?, cpu.period()?);
            (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period) as u32)
        });
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let vcpus = match number(ANNOTATION_VCPUS)? {
            Some(v) => v,
            None => quota_cpus
                .unwrap_or(defaults.vcpus)
                .clamp(1, host_cpus.max(1)),
        };
        Ok(VmSize { memory_mib, vcpus })
    }
}

/// The guest mount and the disk for a bind of host path `source` on `m.destination`.
fn host_bind(
    m: &MountSpec,
    source: &str,
    bundle_dir: &Path,
    index: usize,
) -> Result<(MountSpec, HostBind), String> {
    let path = bundle_dir.join(source);
    let meta = std::fs::metadata(&path).map_err(|e| {
        format!(
            "bind mount source {} on {}: {e}",
            path.display(),
            m.destination
        )
    })?;
    if !meta.is_dir() {
        return Err(format!(
            "bind mount of host file {} on {} is not supported: a microVM sees only block \
             devices, and only directories are carried into it (as a copy)",
            path.display(),
            m.destination
        ));
    }
    if index >= MAX_HOST_BINDS {
        return Err(format!(
            "bind mount of {} on {}: at most {MAX_HOST_BINDS} host directories can be bound \
             into one container",
            path.display(),
            m.destination
        ));
    }
    let mut read_only = false;
    let mut options = Vec::new();
    for o in &m.options {
        // The guest gets one flat copy of the directory (no nested mounts), so a recursive
        // option (`rro`, `rnosuid`, ... of mount_setattr) means the same as the plain one.
        let o = match o.strip_prefix('r') {
            Some(plain) if plain == "ro" || plain == "rw" || CARRIED_OPTIONS.contains(&plain) => {
                plain
            }
            _ => o.as_str(),
        };
        match o {
            "ro" => read_only = true,
            "rw" => read_only = false,
            o if CARRIED_OPTIONS.contains(&o) && !options.iter().any(|x| x == o) => {
                options.push(o.to_string())
            }
            _ => {}
        }
    }
    options.insert(0, if read_only { "ro" } else { "rw" }.to_string());
    let serial = format!("kiln-bind-{index}");
    let mount = MountSpec {
        destination: m.destination.clone(),
        fstype: Some("ext4".into()),
        source: Some(format!("{DISK_BY_SERIAL}{serial}")),
        options,
    };
    let bind = HostBind {
        source: path,
        destination: m.destination.clone(),
        read_only,
        serial,
    };
    Ok((mount, bind))
}

/// Filters the spec's mounts for the guest (see the module documentation).
fn guest_mounts(
    mounts: &[MountSpec],
    bundle_dir: &Path,
) -> Result<(Vec<MountSpec>, Vec<HostBind>), String> {
    let mut out = Vec::with_capacity(mounts.len());
    let mut binds = Vec::new();
    for m in mounts {
        let is_bind = m.fstype.as_deref() == Some("bind")
            || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            if m.source
                .as_deref()
                .is_some_and(|s| s.starts_with(DISK_BY_SERIAL))
            {
                return Err(format!(
                    "mount on {}: sources under {DISK_BY_SERIAL} are reserved for host directory \
                     binds",
                    m.destination
                ));
            }
            out.push(m.clone());
            continue;
        }
        let source = m.source.clone().unwrap_or_default();
        if m.destination == "/dev/shm" {
            log::info!("bind mount {source} on /dev/shm becomes a guest tmpfs");
            out.push(MountSpec {
                destination: m.destination.clone(),
                fstype: Some("tmpfs".into()),
                source: Some("shm".into()),
                options: vec![
                    "nosuid".into(),
                    "noexec".into(),
                    "nodev".into(),
                    "mode=1777".into(),
                ],
            });
        } else if let Some(fstype) = KERNEL_FS_BINDS
            .iter()
            .find(|(host, _)| Path::new(&source) == Path::new(host))
            .map(|(_, fs)| *fs)
        {
            // Rootless engines bind the host's /sys (or /proc) instead of mounting their own;
            // in a VM the guest kernel's own instance is the faithful equivalent (copying the
            // host's pseudo-files into a disk could not work).
            log::info!(
                "bind mount of host {source} on {} becomes the guest's own {fstype}",
                m.destination
            );
            let options = m
                .options
                .iter()
                .map(|o| o.strip_prefix('r').filter(|p| *p == "ro").unwrap_or(o))
                .filter(|o| ["ro", "nosuid", "nodev", "noexec"].contains(o))
                .map(str::to_string)
                .collect();
            out.push(MountSpec {
                destination: m.destination.clone(),
                fstype: Some(fstype.into()),
                source: Some(fstype.into()),
                options,
            });
        } else if SKIPPED_FILE_BINDS.contains(&m.destination.as_str()) {
            log::info!(
                "bind mount of host file {source} on {} skipped: the VM sees only block devices",
                m.destination
            );
        } else if source.is_empty() {
            return Err(format!("bind mount on {} has no source", m.destination));
        } else {
            let (mount, bind) = host_bind(m, &source, bundle_dir, binds.len())?;
            log::info!(
                "bind mount of host directory {} on {} becomes disk {} ({}, a copy taken now)",
                bind.source.display(),
                bind.destination,
                bind.serial,
                if bind.read_only { "ro" } else { "rw" }
            );
            out.push(mount);
            binds.push(bind);
        }
    }
    Ok((out, binds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> (tempfile::TempDir, Result<Bundle, BundleError>) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("rootfs")).unwrap();
        std::fs::write(tmp.path().join("config.json"), config).unwrap();
        let b = Bundle::load(tmp.path());
        (tmp, b)
    }

    const BASE: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#;

    #[test]
    fn errors_name_the_file() {
        let missing = Bundle::load(Path::new("/nonexistent-bundle")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("bundle /nonexistent-bundle: "),
            "{missing}"
        );
        let (_t, bad) = bundle_with("{bad");
        let msg = bad.unwrap_err().to_string();
        assert!(msg.contains("config.json: invalid runtime spec"), "{msg}");
    }

    #[test]
    fn host_binds_refused_known_files_skipped_shm_becomes_tmpfs() {
        let cfg = format!(
            r#"{BASE},"mounts":[
            {{"destination":"/etc/hosts","type":"bind","source":"/x/hosts","options":["bind"]}},
            {{"destination":"/dev/shm","type":"bind","source":"/x/shm","options":["rbind"]}},
            {{"destination":"/proc","type":"proc","source":"proc"}}]}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        let spec = b.unwrap().container_spec().unwrap();
        let dests: Vec<_> = spec.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(dests, ["/dev/shm", "/proc"]);
        assert_eq!(spec.mounts[0].fstype.as_deref(), Some("tmpfs"));
        let cfg = format!(
            r#"{BASE},"mounts":[{{"destination":"/sys","type":"none","source":"/sys",
               "options":["rbind","nosuid","noexec","nodev","rro"]}}]}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        let (spec, binds) = b.unwrap().container_spec_and_binds().unwrap();
        assert!(binds.is_empty());
        assert_eq!(spec.mounts[0].fstype.as_deref(), Some("sysfs"));
        assert_eq!(spec.mounts[0].options, ["nosuid", "noexec", "nodev", "ro"]);
        assert_eq!(spec.root.path, "/rootfs");

        let file = tempfile::NamedTempFile::new().unwrap();
        let cfg = format!(
            r#"{BASE},"mounts":[{{"destination":"/f","type":"bind","source":"{}","options":["rbind"]}}]}}"#,
            file.path().display()
        );
        let (_t, b) = bundle_with(&cfg);
        let err = b.unwrap().container_spec().unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "bind mount of host file {} on /f is not supported",
                file.path().display()
            )),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let cfg = format!(
            r#"{BASE},"mounts":[{{"destination":"/d","type":"bind","source":"/nonexistent-kiln","options":["bind"]}}]}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        let err = b.unwrap().container_spec().unwrap_err().to_string();
        assert!(
            err.contains("bind mount source /nonexistent-kiln on /d: No such file"),
            "{err}"
        );
        let cfg = format!(
            r#"{BASE},"mounts":[{{"destination":"/d","type":"ext4","source":"/dev/disk/by-id/virtio-kiln801-2"}}]}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        let err = b.unwrap().container_spec().unwrap_err().to_string();
        assert!(
            err.contains("are reserved for host directory binds"),
            "{err}"
        );
    }

    #[test]
    fn host_directory_binds_become_disks() {
        let data = tempfile::tempdir().unwrap();
        let cfg = format!(
            r#"{BASE},"mounts":[
            {{"destination":"/data","type":"bind","source":"{src}","options":["rbind","rprivate","nosuid","Z"]}},
            {{"destination":"/proc","type":"proc","source":"proc"}},
            {{"destination":"/conf","source":"{src}","options":["bind","ro","nodev"]}},
            {{"destination":"/rel","type":"bind","source":"rootfs",
              "options":["rbind","rro","rnosuid","nosuid","rnosymfollow","rrelatime"]}}]}}"#,
            src = data.path().display()
        );
        let (t, b) = bundle_with(&cfg);
        let (spec, binds) = b.unwrap().container_spec_and_binds().unwrap();
        let m: Vec<_> = spec
            .mounts
            .iter()
            .map(|m| {
                (
                    m.destination.as_str(),
                    m.fstype.as_deref(),
                    m.source.as_deref(),
                    m.options.join(","),
                )
            })
            .collect();
        assert_eq!(
            m,
            [
                (
                    "/data",
                    Some("ext4"),
                    Some("/dev/disk/by-id/virtio-kiln-bind-0"),
                    "rw,nosuid".to_string()
                ),
                ("/proc", Some("proc"), Some("proc"), String::new()),
                (
                    "/conf",
                    Some("ext4"),
                    Some("/dev/disk/by-id/virtio-kiln-bind-1"),
                    "ro,nodev".to_string()
                ),
                (
                    "/rel",
                    Some("ext4"),
                    Some("/dev/disk/by-id/virtio-kiln-bind-2"),
                    "ro,nosuid,nosymfollow,relatime".to_string()
                ),
            ]
        );
        let summary: Vec<_> = binds
            .iter()
            .map(|b| (b.source.clone(), b.read_only, b.serial.as_str()))
            .collect();
        let bundle_dir = std::fs::canonicalize(t.path()).unwrap();
        assert_eq!(
            summary,
            [
                (data.path().to_path_buf(), false, "kiln-bind-0"),
                (data.path().to_path_buf(), true, "kiln-bind-1"),
                (bundle_dir.join("rootfs"), true, "kiln-bind-2"),
            ]
        );
    }

    #[test]
    fn vm_size_from_annotations_and_limits() {
        let defaults = VmSize {
            memory_mib: 256,
            vcpus: 1,
        };
        let (_t, b) = bundle_with(&format!("{BASE}}}"));
        assert_eq!(b.unwrap().vm_size(defaults).unwrap(), defaults);
        let cfg = format!(
            r#"{BASE},"annotations":{{"io.kiln.vm.memory_mib":"512"}},
            "linux":{{"resources":{{"memory":{{"limit":1073741824}}}}}}}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        assert_eq!(b.unwrap().vm_size(defaults).unwrap().memory_mib, 512);
        let cfg =
            format!(r#"{BASE},"linux":{{"resources":{{"memory":{{"limit":1073741824}}}}}}}}"#);
        let (_t, b) = bundle_with(&cfg);
        assert_eq!(b.unwrap().vm_size(defaults).unwrap().memory_mib, 1024 + 64);
        let cfg = format!(r#"{BASE},"annotations":{{"io.kiln.vm.vcpus":"zero"}}}}"#);
        let (_t, b) = bundle_with(&cfg);
        assert!(b.unwrap().vm_size(defaults).is_err());
    }
}
