//! Mounts of extra disks named by serial: a mount whose source is
//! `/dev/disk/by-id/virtio-<serial>` (the udev name; the guest has no udev) is a virtio-blk
//! device the host attached with that serial, e.g. the image the `kiln` runtime packed from a
//! host directory for a bind mount. The device node is found by reading `/sys/block/vd*/serial`
//! (the kernel asks the device with VIRTIO_BLK_T_GET_ID), so the mount does not depend on the
//! order in which the VMM attached the disks.
//!
//! Only reads sysfs; bounded (at most [`MAX_DISKS`] entries looked at, 64 bytes per serial).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Source prefix that names a virtio disk by serial (the runtime writes the same prefix).
pub const BY_SERIAL_PREFIX: &str = "/dev/disk/by-id/virtio-";
/// Filesystems such a disk may hold.
pub const DISK_FSTYPES: [&str; 2] = ["ext4", "erofs"];
/// Most `/sys/block` entries examined.
const MAX_DISKS: usize = 64;
/// Longest virtio-blk serial (VIRTIO_BLK_ID_BYTES).
const SERIAL_MAX: usize = 20;

/// The serial in `source` when it names a disk by serial.
pub fn serial_in_source(source: &str) -> Option<&str> {
    source.strip_prefix(BY_SERIAL_PREFIX)
}

/// The device node (`/dev/vdX`) of the virtio disk with `serial`, and the checked fs type.
pub fn resolve(serial: &str, fstype: Option<&str>) -> Result<(PathBuf, String), String> {
    let fstype = match fstype {
        Some(t) if DISK_FSTYPES.contains(&t) => t.to_string(),
        Some(t) => return Err(format!("filesystem type `{t}` is not supported on a disk")),
        None => return Err("a disk mount needs a filesystem type".into()),
    };
    let dev = find_by_serial(Path::new("/sys/block"), Path::new("/dev"), serial)?;
    Ok((dev, fstype))
}

/// Looks `serial` up among the `vd*` entries of `sys_block`; returns `dev_dir/<name>`.
pub fn find_by_serial(sys_block: &Path, dev_dir: &Path, serial: &str) -> Result<PathBuf, String> {
    let valid = (1..=SERIAL_MAX).contains(&serial.len())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(format!(
            "disk serial `{serial}` is not 1-20 characters of [A-Za-z0-9-_.]"
        ));
    }
    let entries = std::fs::read_dir(sys_block)
        .map_err(|e| format!("cannot list {}: {e}", sys_block.display()))?;
    for entry in entries.flatten().take(MAX_DISKS) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let plain = name.starts_with("vd") && name.bytes().all(|b| b.is_ascii_alphanumeric());
        if !plain {
            continue;
        }
        let mut buf = [0u8; 64];
        let n = match std::fs::File::open(entry.path().join("serial")) {
            Ok(mut f) => f.read(&mut buf).unwrap_or(0),
            Err(_) => continue,
        };
        let found = buf.get(..n).unwrap_or(&[]);
        let found = found
            .iter()
            .position(|&b| b == 0 || b == b'\n')
            .map_or(found, |end| &found[..end]);
        if found == serial.as_bytes() {
            return Ok(dev_dir.join(name));
        }
    }
    Err(format!(
        "no virtio disk with serial `{serial}` (looked in {})",
        sys_block.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial_not_order() {
        let dir = std::env::temp_dir().join(format!("kiln-disk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, serial) in [
            ("vda", "kiln801-1234\n"),
            ("vdb", "kiln-bind-1"),
            ("vdc", "kiln-bind-0\n"),
            ("loop0", "kiln-bind-2"),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("serial"), serial).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find_by_serial(&dir, dev, "kiln-bind-0").unwrap(),
            Path::new("/dev/vdc")
        );
        assert_eq!(
            find_by_serial(&dir, dev, "kiln-bind-1").unwrap(),
            Path::new("/dev/vdb")
        );
        let e = find_by_serial(&dir, dev, "kiln-bind-2").unwrap_err();
        assert!(
            e.contains("no virtio disk with serial `kiln-bind-2`"),
            "{e}"
        );
        assert!(find_by_serial(&dir, dev, "../vda").is_err());
        assert!(find_by_serial(&dir, dev, "").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn source_and_fstype_checks() {
        assert_eq!(
            serial_in_source("/dev/disk/by-id/virtio-kiln-bind-0"),
            Some("kiln-bind-0")
        );
        assert_eq!(serial_in_source("/dev/vdb"), None);
        assert!(resolve("x", Some("xfs")).unwrap_err().contains("`xfs`"));
        assert!(resolve("x", None).is_err());
    }
}
