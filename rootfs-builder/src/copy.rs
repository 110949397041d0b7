//! Copying a root file system directory into the staging tree, preserving owners, modes,
//! xattrs, times, hard links, symlinks and device nodes. Symlinks are copied, never followed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{BuildError, Result};
use crate::fsops::{self, Special};

/// Copies the contents of `src` into the existing directory `dst` (whose own owner, mode and
/// times become those of `src`).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, (i64, i64))> = Vec::new();
    let root_meta = fs::metadata(src).map_err(|e| BuildError::io(src, "stat", e))?;
    let meta = fsops::meta_of(src, &root_meta);
    fsops::apply_meta(dst, &meta, false, false)
        .map_err(|e| BuildError::io(dst, "set metadata", e))?;
    dirs.push((dst.to_path_buf(), meta.mtime));
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((from_dir, to_dir)) = stack.pop() {
        let entries =
            fs::read_dir(&from_dir).map_err(|e| BuildError::io(&from_dir, "read dir", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| BuildError::io(&from_dir, "read dir", e))?;
            let from = entry.path();
            let to = to_dir.join(entry.file_name());
            let m = fs::symlink_metadata(&from).map_err(|e| BuildError::io(&from, "stat", e))?;
            let meta = fsops::meta_of(&from, &m);
            let ft = m.file_type();
            let fail = |op: &'static str| {
                let to = to.clone();
                move |e: io::Error| BuildError::io(to, op, e)
            };
            if ft.is_dir() {
                fs::create_dir(&to).map_err(fail("mkdir"))?;
                fsops::apply_meta(&to, &meta, false, false).map_err(fail("set metadata"))?;
                dirs.push((to.clone(), meta.mtime));
                stack.push((from, to));
                continue;
            }
            if m.nlink() > 1 {
                if let Some(first) = links.get(&(m.dev(), m.ino())) {
                    fs::hard_link(first, &to).map_err(fail("link"))?;
                    continue;
                }
                links.insert((m.dev(), m.ino()), to.clone());
            }
            if ft.is_file() {
                let mut input = File::open(&from).map_err(|e| BuildError::io(&from, "open", e))?;
                let mut output = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&to)
                    .map_err(fail("create"))?;
                io::copy(&mut input, &mut output).map_err(fail("copy"))?;
                drop(output);
                fsops::apply_meta(&to, &meta, false, true).map_err(fail("set metadata"))?;
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&from).map_err(|e| BuildError::io(&from, "readlink", e))?;
                std::os::unix::fs::symlink(target, &to).map_err(fail("symlink"))?;
                fsops::apply_meta(&to, &meta, true, true).map_err(fail("set metadata"))?;
            } else {
                let rdev = m.rdev();
                let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
                let kind = if ft.is_char_device() {
                    Special::Char(major, minor)
                } else if ft.is_block_device() {
                    Special::Block(major, minor)
                } else if ft.is_fifo() {
                    Special::Fifo
                } else {
                    log::warn!("{}: skipping socket", from.display());
                    continue;
                };
                if fsops::make_special(&to, kind).map_err(fail("mknod"))? {
                    fsops::apply_meta(&to, &meta, false, true).map_err(fail("set metadata"))?;
                } else {
                    log::warn!("{}: device node skipped (mknod needs root)", from.display());
                }
            }
        }
    }
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dir, time) in dirs {
        fsops::set_mtime(&dir, time).map_err(|e| BuildError::io(&dir, "set times", e))?;
    }
    Ok(())
}
