//! OCI bundles: reading `config.json`, checking what a microVM can honour, and turning the spec
//! into the agent's [`ContainerSpec`] plus the VM's size.
//!
//! The VM sees only block devices, so a bind mount of a host path cannot be honoured. The few
//! files container engines bind over every container (`/etc/hosts`, `/etc/hostname`,
//! `/etc/resolv.conf`, `/run/.containerenv`) are skipped with a warning (the image's own copies
//! stay visible); `/dev/shm` binds become a guest tmpfs; any other host bind mount is refused
//! with an error naming it. Namespace paths name host namespaces, which the guest cannot join:
//! the guest creates fresh namespaces of those kinds instead.

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

/// Destinations of host file binds that engines add to every container and kiln skips.
const SKIPPED_FILE_BINDS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/run/.containerenv",
];

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

    /// The spec as the agent needs it. Host bind mounts are refused or skipped as the module
    /// documentation says.
    pub fn container_spec(&self) -> Result<ContainerSpec, BundleError> {
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
        spec.mounts = guest_mounts(&spec.mounts).map_err(|problem| BundleError::Unsupported {
            path: self.config_path(),
            problem,
        })?;
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
        Ok(spec)
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

/// Filters the spec's mounts for the guest (see the module documentation).
fn guest_mounts(mounts: &[MountSpec]) -> Result<Vec<MountSpec>, String> {
    let mut out = Vec::with_capacity(mounts.len());
    for m in mounts {
        let is_bind = m.fstype.as_deref() == Some("bind")
            || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if !is_bind {
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
        } else if SKIPPED_FILE_BINDS.contains(&m.destination.as_str()) {
            log::info!(
                "bind mount of host file {source} on {} skipped: the VM sees only block devices",
                m.destination
            );
        } else {
            return Err(format!(
                "bind mount of host path {source} on {} is not supported: a microVM sees only \
                 block devices (remove the mount or copy the files into the image)",
                m.destination
            ));
        }
    }
    Ok(out)
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
        assert_eq!(spec.root.path, "/rootfs");

        let cfg = format!(
            r#"{BASE},"mounts":[{{"destination":"/data","type":"bind","source":"/srv","options":["rbind"]}}]}}"#
        );
        let (_t, b) = bundle_with(&cfg);
        let err = b.unwrap().container_spec().unwrap_err().to_string();
        assert!(
            err.contains("bind mount of host path /srv on /data is not supported"),
            "{err}"
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
