//! Turning a staging tree into a block image with Debian's `mkfs.ext4 -d` (e2fsprogs) or
//! `mkfs.erofs` (erofs-utils), sizing ext4 from the content, and copying images sparsely.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::error::{BuildError, Result};

/// Block image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Read-write ext4 (default).
    #[default]
    Ext4,
    /// Read-only EROFS (uncompressed, or LZ4HC with [`crate::BuildOptions::erofs_compression`]).
    Erofs,
}

impl Format {
    /// File extension used in the cache.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Ext4 => "ext4",
            Format::Erofs => "erofs",
        }
    }
}

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
const INODE_SIZE: u64 = 256;

/// Space and inodes a tree needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeStats {
    /// Bytes of data and directory blocks, rounded up to 4 KiB per file.
    pub bytes: u64,
    /// Number of inodes (hard links counted once).
    pub inodes: u64,
}

/// Walks `root` (without following symlinks) and counts blocks and inodes.
pub fn tree_stats(root: &Path) -> io::Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        stats.inodes += 1;
        stats.bytes += BLOCK;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            if m.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            stats.inodes += 1;
            if m.is_file() || (m.file_type().is_symlink() && m.len() >= 60) {
                stats.bytes += m.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(stats)
}

/// Number of inodes to ask mkfs.ext4 for: content plus a quarter, at least 4096.
pub fn ext4_inodes(stats: &TreeStats) -> u64 {
    (stats.inodes + stats.inodes / 4 + 256).max(4096)
}

/// Automatic ext4 size: data + inode tables, 20% + 16 MiB headroom, plus the journal mke2fs
/// will create, rounded up to a MiB.
pub fn ext4_auto_size(stats: &TreeStats) -> u64 {
    let base = stats.bytes + ext4_inodes(stats) * INODE_SIZE;
    let with_headroom = base + base / 5 + 16 * MIB;
    // ext2fs_default_journal_size(): 4 MiB up to 128 MiB, 16 MiB up to 1 GiB, then 32/64 MiB.
    let journal = match with_headroom {
        s if s < 128 * MIB => 4 * MIB,
        s if s < 1024 * MIB => 16 * MIB,
        s if s < 2048 * MIB => 32 * MIB,
        _ => 64 * MIB,
    };
    (with_headroom + journal).div_ceil(MIB) * MIB
}

/// Runs `mkfs.ext4 -d staging` into `image` (created here with `size` bytes). When `size` was
/// chosen automatically and turns out too small, retries with 50% more, twice.
pub fn make_ext4(
    staging: &Path,
    image: &Path,
    size: Option<u64>,
    stats: &TreeStats,
) -> Result<u64> {
    let auto = size.is_none();
    let mut bytes = size.unwrap_or_else(|| ext4_auto_size(stats));
    for attempt in 0..3 {
        let _ = fs::remove_file(image);
        let file = File::create(image).map_err(|e| BuildError::io(image, "create", e))?;
        file.set_len(bytes)
            .map_err(|e| BuildError::io(image, "resize", e))?;
        drop(file);
        // The file is new and sparse, so the journal already reads as zeros: no need to write
        // them (lazy_journal_init=1). Inode tables are zeroed now (lazy_itable_init=0) so the
        // guest kernel does not start ext4lazyinit.
        let out = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-m",
                "0",
                "-L",
                "kiln-rootfs",
            ])
            .arg("-N")
            .arg(ext4_inodes(stats).to_string())
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=1"])
            .arg("-d")
            .arg(staging)
            .arg(image)
            .output()
            .map_err(|e| BuildError::Mkfs {
                tool: "mkfs.ext4",
                path: image.to_path_buf(),
                message: format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"),
            })?;
        if out.status.success() {
            return Ok(bytes);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let full = stderr.contains("Could not allocate block")
            || stderr.contains("No space left")
            || stderr.contains("Could not allocate inode");
        if auto && full && attempt < 2 {
            log::info!("mkfs.ext4: {bytes} bytes too small, retrying with more space");
            bytes = (bytes + bytes / 2).div_ceil(MIB) * MIB;
            continue;
        }
        let hint = if full && !auto {
            format!(" (the --size of {bytes} bytes is too small for the content)")
        } else {
            String::new()
        };
        return Err(BuildError::Mkfs {
            tool: "mkfs.ext4",
            path: image.to_path_buf(),
            message: format!("{}{hint}: {}", out.status, last_lines(&stderr)),
        });
    }
    unreachable!("the loop returns on its last attempt")
}

/// Runs `mkfs.erofs` (uncompressed, or with `compression` such as `lz4hc`).
pub fn make_erofs(staging: &Path, image: &Path, compression: Option<&str>) -> Result<u64> {
    let _ = fs::remove_file(image);
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("-d1");
    if let Some(c) = compression {
        cmd.arg(format!("-z{c}"));
    }
    let out = cmd
        .arg(image)
        .arg(staging)
        .output()
        .map_err(|e| BuildError::Mkfs {
            tool: "mkfs.erofs",
            path: image.to_path_buf(),
            message: format!("cannot run mkfs.erofs (install erofs-utils): {e}"),
        })?;
    if !out.status.success() {
        return Err(BuildError::Mkfs {
            tool: "mkfs.erofs",
            path: image.to_path_buf(),
            message: format!(
                "{}: {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr))
            ),
        });
    }
    fs::metadata(image)
        .map(|m| m.len())
        .map_err(|e| BuildError::io(image, "stat", e))
}

fn last_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Copies `src` to a new file `dst`, reproducing holes (images are mostly sparse) and using
/// `copy_file_range` for the data (std's `io::copy` between files does); with `sync`, fsyncs it.
pub fn sparse_copy(src: &Path, dst: &Path, sync: bool) -> io::Result<()> {
    let mut input = File::open(src)?;
    let len = input.metadata()?.len();
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    output.set_len(len)?;
    let mut offset: u64 = 0;
    while offset < len {
        let data = match nix::unistd::lseek(&input, offset as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = nix::unistd::lseek(&input, data as i64, nix::unistd::Whence::SeekHole)? as u64;
        input.seek(SeekFrom::Start(data))?;
        output.seek(SeekFrom::Start(data))?;
        let want = hole - data;
        let copied = io::copy(&mut (&mut input).take(want), &mut output)?;
        if copied != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        offset = hole;
    }
    if sync {
        output.sync_all()?;
    }
    Ok(())
}

/// Parses sizes such as `512M`, `2G`, `1048576`, `64MiB`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("invalid size unit in {text:?} (use K, M, G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn auto_size_grows_with_content() {
        let small = ext4_auto_size(&TreeStats {
            bytes: 1 << 20,
            inodes: 100,
        });
        let big = ext4_auto_size(&TreeStats {
            bytes: 500 << 20,
            inodes: 20000,
        });
        assert!(small >= (1 << 20) + 16 * MIB);
        assert!(big > 600 << 20 && big < 700 << 20, "{big}");
    }
}
