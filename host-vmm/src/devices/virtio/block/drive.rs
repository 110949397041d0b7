//! Extra disks (`--drive PATH[,ro][,serial=ID]`): the user-facing description of one
//! virtio-blk device after the root disk, parsed and checked here so the CLI and library users
//! get the same one-line errors.
//!
//! Drives follow the root disk in order (`/dev/vdb`, `/dev/vdc`, ... when a rootfs is attached).
//! A guest that must not depend on that order finds a drive by its serial
//! (`/sys/block/vdX/serial`, answered by VIRTIO_BLK_T_GET_ID).
//!
//! Under `--jail`, drive N is bind-mounted at `/drives/N` inside the jail (read-only for `ro`)
//! and opened there (`jail::fs`); the derived serial is unchanged, since a bind mount keeps
//! the file's device and inode numbers.

use std::path::PathBuf;
use std::str::FromStr;

use super::request::ID_LEN;

/// Most extra drives a VM may have (the root disk and vsock need slots too; the I/O APIC has
/// 19 pins for virtio devices).
pub const MAX_DRIVES: usize = 8;

/// One extra disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// Open with `O_RDONLY` and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// GET_ID answer; `None` derives one from the file's device and inode numbers.
    pub serial: Option<String>,
}

/// A `--drive` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriveError {
    /// No path before the first comma.
    #[error("--drive {0:?}: the path is empty")]
    EmptyPath(String),
    /// An option other than `ro`, `rw`, `serial=`.
    #[error("--drive {value:?}: unknown option {option:?} (expected ro, rw or serial=ID)")]
    UnknownOption {
        /// The whole value.
        value: String,
        /// The option.
        option: String,
    },
    /// A serial that is empty, too long or not plain ASCII.
    #[error("--drive {value:?}: serial must be 1 to {ID_LEN} characters of A-Z a-z 0-9 - _ .")]
    BadSerial {
        /// The whole value.
        value: String,
    },
}

/// Whether `serial` can be a GET_ID answer that guests read back unchanged.
pub fn valid_serial(serial: &str) -> bool {
    (1..=ID_LEN).contains(&serial.len())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl FromStr for DriveConfig {
    type Err = DriveError;

    /// `PATH[,ro|,rw][,serial=ID]`. A path containing a comma is written with `,,` (as QEMU
    /// does).
    fn from_str(value: &str) -> Result<Self, DriveError> {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut chars = value.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    parts.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        parts.push(current);
        let mut parts = parts.into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DriveError::EmptyPath(value.to_string()));
        }
        let mut drive = DriveConfig {
            path: PathBuf::from(path),
            read_only: false,
            serial: None,
        };
        for option in parts {
            match option.as_str() {
                "ro" => drive.read_only = true,
                "rw" => drive.read_only = false,
                _ => match option.strip_prefix("serial=") {
                    Some(s) if valid_serial(s) => drive.serial = Some(s.to_string()),
                    Some(_) => {
                        return Err(DriveError::BadSerial {
                            value: value.to_string(),
                        })
                    }
                    None => {
                        return Err(DriveError::UnknownOption {
                            value: value.to_string(),
                            option,
                        })
                    }
                },
            }
        }
        Ok(drive)
    }
}

/// The 20-byte GET_ID answer for `serial` (zero padded).
pub fn serial_id(serial: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = serial.len().min(ID_LEN);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_options() {
        let d: DriveConfig = "/a/b.img".parse().unwrap();
        assert_eq!(
            d,
            DriveConfig {
                path: "/a/b.img".into(),
                read_only: false,
                serial: None
            }
        );
        let d: DriveConfig = "/a,,b.img,ro,serial=kiln-bind-0".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b.img"));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("kiln-bind-0"));
        let d: DriveConfig = "x,ro,rw".parse().unwrap();
        assert!(!d.read_only);
    }

    #[test]
    fn rejects_bad_values_with_one_line() {
        for (value, want) in [
            (",ro", "--drive \",ro\": the path is empty"),
            (
                "x,cache=none",
                "--drive \"x,cache=none\": unknown option \"cache=none\" (expected ro, rw or serial=ID)",
            ),
            (
                "x,serial=",
                "--drive \"x,serial=\": serial must be 1 to 20 characters of A-Z a-z 0-9 - _ .",
            ),
        ] {
            let e = value.parse::<DriveConfig>().unwrap_err().to_string();
            assert_eq!(e, want);
            assert!(!e.contains('\n'));
        }
        assert!("x,serial=123456789012345678901"
            .parse::<DriveConfig>()
            .is_err());
        assert!("x,serial=a b".parse::<DriveConfig>().is_err());
        assert!("x,serial=12345678901234567890"
            .parse::<DriveConfig>()
            .is_ok());
    }

    #[test]
    fn serial_id_is_zero_padded() {
        let id = serial_id("abc");
        assert_eq!(&id[..4], b"abc\0");
        assert_eq!(id.len(), ID_LEN);
    }
}
