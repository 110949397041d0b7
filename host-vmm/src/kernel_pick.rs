//! Which guest kernel to boot when the user does not name one (`--kernel auto`, the default).
//!
//! kiln builds its guest kernel in two flavours (kernel-config/README.md): the default one, and
//! the PVM flavour, which is the only one whose userspace runs on a host whose `/dev/kvm` is PVM
//! (`/sys/module/kvm_pvm`, design.md "This machine's KVM is PVM"). This module owns the rule
//! that turns `auto` into a file, in this order:
//!
//! 1. `$KILN_KERNEL`, if set: an explicit choice, used as given whatever the host.
//! 2. The installed kernel of the host's flavour: `/usr/lib/kiln/vmlinux-pvm` on a PVM host,
//!    `/usr/lib/kiln/vmlinux` otherwise.
//! 3. The stable link `kernel-config/build.sh` keeps to the kernel it last built or returned
//!    for the flavour: `<cache>/pvm/vmlinux` on a PVM host, `<cache>/vmlinux` otherwise, where
//!    `<cache>` is `$KILN_KERNEL_CACHE` or `/var/cache/kiln/kernel`.
//!
//! A PVM host never falls back to the default flavour (its userspace dies on the first system
//! call there) and a KVM host never picks the PVM flavour. An explicit path (`--kernel PATH`) is
//! not this module's business: it is always honoured as given. The kiln runtime's config
//! (`runtime/src/config.rs`) applies the same order.
//!
//! Pure apart from [`HostFacts::system`]: the rule itself takes the facts as arguments so it is
//! unit-tested without touching `/sys` or the environment.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// The `--kernel` value that asks for the automatic choice.
pub const AUTO: &str = "auto";

/// Default root of `kernel-config/build.sh`'s cache.
pub const DEFAULT_CACHE: &str = "/var/cache/kiln/kernel";

/// Where a packaged kiln installs its kernels.
pub const INSTALL_DIR: &str = "/usr/lib/kiln";

/// The kernel flavours `kernel-config/build.sh --flavour` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// For hardware KVM (and QEMU).
    Default,
    /// For PVM hosts (`patches-pvm/`).
    Pvm,
}

impl Flavour {
    /// The flavour this host needs.
    pub fn for_host(pvm: bool) -> Flavour {
        if pvm {
            Flavour::Pvm
        } else {
            Flavour::Default
        }
    }

    /// The `build.sh --flavour` name.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Default => "default",
            Flavour::Pvm => "pvm",
        }
    }

    /// The installed file under `install_dir`.
    pub fn installed(self, install_dir: &Path) -> PathBuf {
        match self {
            Flavour::Default => install_dir.join("vmlinux"),
            Flavour::Pvm => install_dir.join("vmlinux-pvm"),
        }
    }

    /// `build.sh`'s stable link under the cache root.
    pub fn cache_link(self, cache: &Path) -> PathBuf {
        match self {
            Flavour::Default => cache.join("vmlinux"),
            Flavour::Pvm => cache.join("pvm/vmlinux"),
        }
    }
}

/// No kernel of the needed flavour is installed.
#[derive(Debug, Error)]
#[error(
    "no {what} kiln kernel installed (looked for {tried}); build one with \
     `kernel-config/build.sh{flag}` or pass --kernel PATH",
    what = match .flavour { Flavour::Pvm => "PVM-flavour", Flavour::Default => "default-flavour" },
    tried = .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    flag = match .flavour { Flavour::Pvm => " --flavour pvm", Flavour::Default => "" },
)]
pub struct KernelPickError {
    /// The flavour the host needs.
    pub flavour: Flavour,
    /// The files looked at, in order.
    pub tried: Vec<PathBuf>,
}

/// What the choice depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's KVM is PVM.
    pub pvm: bool,
    /// `$KILN_KERNEL`.
    pub env_kernel: Option<PathBuf>,
    /// The installed kernels' directory.
    pub install_dir: PathBuf,
    /// `build.sh`'s cache root.
    pub cache: PathBuf,
}

impl HostFacts {
    /// This host: `/sys/module/kvm_pvm`, `$KILN_KERNEL`, [`INSTALL_DIR`], `$KILN_KERNEL_CACHE`
    /// or [`DEFAULT_CACHE`].
    pub fn system() -> HostFacts {
        HostFacts {
            pvm: crate::boot::cmdline::is_pvm_host(Path::new("/sys")),
            env_kernel: std::env::var_os("KILN_KERNEL")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            install_dir: PathBuf::from(INSTALL_DIR),
            cache: std::env::var_os("KILN_KERNEL_CACHE")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from),
        }
    }
}

/// The chosen kernel and one line saying why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickedKernel {
    /// The kernel file (links resolved, so the log and a jail see the real file).
    pub path: PathBuf,
    /// E.g. "PVM host: using the PVM kernel flavour /var/cache/kiln/kernel/pvm/<key>/vmlinux".
    pub reason: String,
}

/// The automatic choice for a host with these facts.
pub fn pick(facts: &HostFacts) -> Result<PickedKernel, KernelPickError> {
    if let Some(path) = &facts.env_kernel {
        return Ok(PickedKernel {
            path: path.clone(),
            reason: format!("using $KILN_KERNEL {}", path.display()),
        });
    }
    let flavour = Flavour::for_host(facts.pvm);
    let tried = vec![
        flavour.installed(&facts.install_dir),
        flavour.cache_link(&facts.cache),
    ];
    let Some(found) = tried.iter().find(|p| p.is_file()) else {
        return Err(KernelPickError { flavour, tried });
    };
    let path = std::fs::canonicalize(found).unwrap_or_else(|_| found.clone());
    let reason = match flavour {
        Flavour::Pvm => format!("PVM host: using the PVM kernel flavour {}", path.display()),
        Flavour::Default => format!("using the default kernel flavour {}", path.display()),
    };
    Ok(PickedKernel { path, reason })
}

/// `--kernel` as given: `auto` becomes the automatic choice (logged at info level), any other
/// value is returned unchanged.
pub fn resolve(requested: &Path, facts: &HostFacts) -> Result<PathBuf, KernelPickError> {
    if requested != Path::new(AUTO) {
        return Ok(requested.to_path_buf());
    }
    let picked = pick(facts)?;
    log::info!("{}", picked.reason);
    Ok(picked.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("kiln-kpick-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn facts(d: &Path, pvm: bool) -> HostFacts {
        HostFacts {
            pvm,
            env_kernel: None,
            install_dir: d.join("lib"),
            cache: d.join("cache"),
        }
    }
    /// `<cache>/<key>/vmlinux` plus build.sh's relative link to it.
    fn cache_kernel(cache: &Path, flavour: Flavour, key: &str) -> PathBuf {
        let link = flavour.cache_link(cache);
        let dir = link.parent().unwrap().join(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"ELF").unwrap();
        std::os::unix::fs::symlink(format!("{key}/vmlinux"), &link).unwrap();
        std::fs::canonicalize(dir.join("vmlinux")).unwrap()
    }

    #[test]
    fn explicit_paths_are_honoured_as_given() {
        let d = tmp("explicit");
        let f = facts(&d.0, true);
        // Even a missing file: VmConfig::validate reports it with its name.
        assert_eq!(
            resolve(Path::new("/no/such/vmlinux"), &f).unwrap(),
            PathBuf::from("/no/such/vmlinux")
        );
        assert_eq!(
            resolve(Path::new("./auto"), &f).unwrap(),
            PathBuf::from("./auto")
        );
    }

    #[test]
    fn pvm_host_picks_the_pvm_flavour_link() {
        let d = tmp("pvm");
        let f = facts(&d.0, true);
        cache_kernel(&f.cache, Flavour::Default, "aaa");
        let pvm = cache_kernel(&f.cache, Flavour::Pvm, "bbb");
        let picked = pick(&f).unwrap();
        assert_eq!(picked.path, pvm);
        assert_eq!(
            picked.reason,
            format!("PVM host: using the PVM kernel flavour {}", pvm.display())
        );
        assert_eq!(resolve(Path::new(AUTO), &f).unwrap(), pvm);
    }

    #[test]
    fn kvm_host_picks_the_default_flavour_never_pvm() {
        let d = tmp("kvm");
        let f = facts(&d.0, false);
        cache_kernel(&f.cache, Flavour::Pvm, "bbb");
        let err = pick(&f).unwrap_err();
        assert_eq!(err.flavour, Flavour::Default);
        let default = cache_kernel(&f.cache, Flavour::Default, "aaa");
        let picked = pick(&f).unwrap();
        assert_eq!(picked.path, default);
        assert!(picked
            .reason
            .starts_with("using the default kernel flavour"));
    }

    #[test]
    fn installed_kernel_wins_over_the_build_cache() {
        let d = tmp("installed");
        let f = facts(&d.0, true);
        cache_kernel(&f.cache, Flavour::Pvm, "bbb");
        std::fs::create_dir_all(&f.install_dir).unwrap();
        std::fs::write(f.install_dir.join("vmlinux-pvm"), b"ELF").unwrap();
        let picked = pick(&f).unwrap();
        assert_eq!(
            picked.path,
            std::fs::canonicalize(f.install_dir.join("vmlinux-pvm")).unwrap()
        );
    }

    #[test]
    fn env_override_wins_on_any_host() {
        let d = tmp("env");
        let mut f = facts(&d.0, true);
        cache_kernel(&f.cache, Flavour::Pvm, "bbb");
        f.env_kernel = Some("/my/vmlinux".into());
        let picked = pick(&f).unwrap();
        assert_eq!(picked.path, PathBuf::from("/my/vmlinux"));
        assert!(picked.reason.contains("$KILN_KERNEL"), "{}", picked.reason);
    }

    #[test]
    fn pvm_host_without_a_pvm_kernel_names_the_build_command() {
        let d = tmp("none");
        let f = facts(&d.0, true);
        // A default-flavour kernel is not a fallback on PVM.
        cache_kernel(&f.cache, Flavour::Default, "aaa");
        let msg = pick(&f).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.starts_with("no PVM-flavour kiln kernel installed"),
            "{msg}"
        );
        assert!(
            msg.contains("`kernel-config/build.sh --flavour pvm`"),
            "{msg}"
        );
        assert!(
            msg.contains("vmlinux-pvm") && msg.contains("pvm/vmlinux"),
            "{msg}"
        );
        let msg = pick(&facts(&d.0.join("empty"), false))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`kernel-config/build.sh`"), "{msg}");
    }
}
