//! Tiny disk images for boot tests: a busybox-static ext4 root filesystem with a test `/init`.
//!
//! This is a stop-gap for the Linux boot tests: `mkfs.ext4 -d` packs a temporary directory holding
//! `/bin/busybox` (Debian's `busybox-static`), one symlink per applet and the caller's `/init`
//! script. The rootfs-builder crate replaces it once it can build images itself. Nothing here
//! knows about containers or guest-init.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where Debian's busybox-static installs its statically linked binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Size of the images built here; busybox is about 2 MiB.
const IMAGE_MIB: u32 = 16;

/// Builds `<dir>/rootfs.ext4`: busybox with its applet symlinks in `/bin`, the empty mount points
/// `/dev`, `/proc`, `/sys`, `/tmp`, `/run`, and `init_script` as the executable `/init`
/// (start it with `#!/bin/sh`). `dir` must exist; the staging tree goes to `<dir>/rootfs/`.
pub fn busybox_ext4(dir: &Path, init_script: &str) -> Result<PathBuf> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        bail!("{BUSYBOX} missing: install Debian's busybox-static");
    }
    let root = dir.join("rootfs");
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("removing old staging tree {}", root.display()))?;
    }
    for sub in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "root"] {
        std::fs::create_dir_all(root.join(sub))
            .with_context(|| format!("creating {}", root.join(sub).display()))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX}"))?;

    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list"))?;
    if !list.status.success() {
        bail!("{BUSYBOX} --list failed: {}", list.status);
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        // Applet names are plain words; anything else would escape /bin.
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        symlink("busybox", root.join("bin").join(applet))
            .with_context(|| format!("linking /bin/{applet}"))?;
    }

    let init = root.join("init");
    std::fs::write(&init, init_script).with_context(|| format!("writing {}", init.display()))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", init.display()))?;

    let image = dir.join("rootfs.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "kiln-test", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{IMAGE_MIB}M"))
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d {} {} failed ({}): {}",
            root.display(),
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_holds_busybox_and_init() {
        if !Path::new(BUSYBOX).is_file() {
            eprintln!("skipping: {BUSYBOX} missing");
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-images-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = busybox_ext4(&dir, "#!/bin/sh\necho hello\n").unwrap();
        // debugfs reads the image without mounting it.
        let out = Command::new("debugfs")
            .args(["-R", "cat /init"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "#!/bin/sh\necho hello\n"
        );
        let out = Command::new("debugfs")
            .args(["-R", "stat /bin/sh"])
            .arg(&image)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&out.stdout);
        assert!(stat.contains("Type: symlink"), "{stat}");
        assert!(stat.contains("Fast link dest: \"busybox\""), "{stat}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
