//! Applying layer tarballs to a staging directory: whiteouts (`.wh.NAME`, opaque
//! `.wh..wh..opq`), hard links, symlinks, device nodes, owners, modes, xattrs and times.
//!
//! Every entry path is normalised and resolved inside the staging root ([`crate::fsops`]); an
//! entry that would land outside it (`..`, absolute path, a write through an escaping symlink, a
//! hard link to something outside) fails the whole build with an error naming layer and entry.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{BuildError, Result};
use crate::fsops::{self, EntryMeta, Missing, ResolveError, Special};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Applies layers, one after the other, to a staging root.
pub struct LayerApplier {
    root: PathBuf,
    dir_times: BTreeMap<PathBuf, (i64, i64)>,
    skipped_devices: usize,
}

impl LayerApplier {
    /// An applier writing into `root` (which must exist).
    pub fn new(root: &Path) -> Self {
        LayerApplier {
            root: root.to_path_buf(),
            dir_times: BTreeMap::new(),
            skipped_devices: 0,
        }
    }

    /// Applies one layer read from `reader` (an uncompressed tar stream). `name` identifies the
    /// layer in errors. With `whiteouts` false, `.wh.` files are ordinary files (plain rootfs
    /// tarballs).
    pub fn apply(&mut self, name: &str, reader: impl Read, whiteouts: bool) -> Result<()> {
        let read_err = |source: io::Error| BuildError::LayerRead {
            layer: name.to_string(),
            source,
        };
        let mut archive = tar::Archive::new(reader);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let raw = entry.path().map_err(read_err)?.into_owned();
            let shown = raw.display().to_string();
            let parts = fsops::normalize(&raw).map_err(|r| BuildError::entry(name, &shown, r))?;
            let file_name = parts
                .last()
                .map(|p| p.as_bytes().to_vec())
                .unwrap_or_default();
            if whiteouts && file_name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                self.whiteout(name, &shown, &parts, &this_layer)?;
                continue;
            }
            let meta = entry_meta(&mut entry).map_err(|e| BuildError::entry(name, &shown, e))?;
            let kind = entry.header().entry_type();
            if parts.is_empty() {
                if kind.is_dir() {
                    fsops::apply_meta(&self.root, &meta, false, false)
                        .map_err(|e| BuildError::io(&self.root, "set metadata", e))?;
                    self.dir_times.insert(PathBuf::new(), meta.mtime);
                    continue;
                }
                return Err(BuildError::entry(
                    name,
                    &shown,
                    "the root must be a directory",
                ));
            }
            let parent =
                fsops::resolve(&self.root, &parts[..parts.len() - 1], true, Missing::Create)
                    .map_err(|e| BuildError::entry(name, &shown, e.to_string()))?;
            let mut real = parent;
            real.push(parts[parts.len() - 1].clone());
            let rel = fsops::join(&real);
            let host = self.root.join(&rel);
            let fail =
                |op: &str, e: io::Error| BuildError::entry(name, &shown, format!("{op}: {e}"));
            use tar::EntryType as T;
            match kind {
                T::Directory => {
                    let is_dir = fs::symlink_metadata(&host)
                        .map(|m| m.is_dir())
                        .unwrap_or(false);
                    if !is_dir {
                        fsops::remove_any(&host).map_err(|e| fail("remove", e))?;
                        fs::create_dir(&host).map_err(|e| fail("mkdir", e))?;
                    }
                    fsops::apply_meta(&host, &meta, false, false)
                        .map_err(|e| fail("metadata", e))?;
                    self.dir_times.insert(rel.clone(), meta.mtime);
                }
                T::Regular | T::Continuous | T::GNUSparse => {
                    fsops::remove_any(&host).map_err(|e| fail("remove", e))?;
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&host)
                        .map_err(|e| fail("create", e))?;
                    io::copy(&mut entry, &mut file).map_err(read_err)?;
                    drop(file);
                    fsops::apply_meta(&host, &meta, false, true)
                        .map_err(|e| fail("metadata", e))?;
                }
                T::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(read_err)?
                        .ok_or_else(|| BuildError::entry(name, &shown, "symlink without a target"))?
                        .into_owned();
                    fsops::remove_any(&host).map_err(|e| fail("remove", e))?;
                    std::os::unix::fs::symlink(&target, &host).map_err(|e| fail("symlink", e))?;
                    fsops::apply_meta(&host, &meta, true, true).map_err(|e| fail("metadata", e))?;
                }
                T::Link => {
                    let target = entry
                        .link_name()
                        .map_err(read_err)?
                        .ok_or_else(|| {
                            BuildError::entry(name, &shown, "hard link without a target")
                        })?
                        .into_owned();
                    let src = self.hardlink_source(&target).map_err(|r| {
                        BuildError::entry(
                            name,
                            &shown,
                            format!("hard link to {}: {r}", target.display()),
                        )
                    })?;
                    if src != host {
                        fsops::remove_any(&host).map_err(|e| fail("remove", e))?;
                        fs::hard_link(&src, &host).map_err(|e| fail("link", e))?;
                    }
                }
                T::Char | T::Block | T::Fifo => {
                    let major =
                        u64::from(entry.header().device_major().ok().flatten().unwrap_or(0));
                    let minor =
                        u64::from(entry.header().device_minor().ok().flatten().unwrap_or(0));
                    let special = match kind {
                        T::Char => Special::Char(major, minor),
                        T::Block => Special::Block(major, minor),
                        _ => Special::Fifo,
                    };
                    fsops::remove_any(&host).map_err(|e| fail("remove", e))?;
                    if fsops::make_special(&host, special).map_err(|e| fail("mknod", e))? {
                        fsops::apply_meta(&host, &meta, false, true)
                            .map_err(|e| fail("metadata", e))?;
                    } else {
                        self.skipped_devices += 1;
                        log::warn!("{name}: {shown}: device node skipped (mknod needs root)");
                        continue;
                    }
                }
                T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
                other => {
                    log::warn!("{name}: {shown}: skipping unsupported tar entry type {other:?}");
                    continue;
                }
            }
            this_layer.insert(rel);
        }
        Ok(())
    }

    /// Sets directory modification times, deepest first, once all layers are applied.
    pub fn finish(self) -> Result<()> {
        if self.skipped_devices > 0 {
            log::warn!(
                "{} device nodes were skipped (not root)",
                self.skipped_devices
            );
        }
        let mut dirs: Vec<_> = self.dir_times.into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, time) in dirs {
            let host = self.root.join(&rel);
            match fsops::set_mtime(&host, time) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BuildError::io(host, "set times", e)),
            }
        }
        Ok(())
    }

    fn hardlink_source(&self, target: &Path) -> std::result::Result<PathBuf, String> {
        let parts = fsops::normalize(target)?;
        let Some((last, dir)) = parts.split_last() else {
            return Err("target is the root".into());
        };
        let mut real =
            fsops::resolve(&self.root, dir, true, Missing::Fail).map_err(|e| e.to_string())?;
        real.push(last.clone());
        let src = self.root.join(fsops::join(&real));
        match fs::symlink_metadata(&src) {
            Ok(m) if m.is_dir() => Err("target is a directory".into()),
            Ok(_) => Ok(src),
            Err(e) => Err(format!("target does not exist in the layers below ({e})")),
        }
    }

    fn whiteout(
        &self,
        layer: &str,
        shown: &str,
        parts: &[OsString],
        this_layer: &HashSet<PathBuf>,
    ) -> Result<()> {
        let (marker, dir) = parts.split_last().expect("whiteout has a file name");
        let parent = match fsops::resolve(&self.root, dir, true, Missing::Fail) {
            Ok(p) => p,
            Err(ResolveError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(BuildError::entry(layer, shown, e.to_string())),
        };
        let parent_rel = fsops::join(&parent);
        let parent_host = self.root.join(&parent_rel);
        let marker = marker.to_string_lossy();
        if marker == OPAQUE_MARKER {
            let children = match fs::read_dir(&parent_host) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(BuildError::io(parent_host, "read dir", e)),
            };
            for child in children {
                let child = child.map_err(|e| BuildError::io(&parent_host, "read dir", e))?;
                let rel = parent_rel.join(child.file_name());
                if !this_layer.contains(&rel) {
                    fsops::remove_any(&child.path())
                        .map_err(|e| BuildError::io(child.path(), "remove (opaque whiteout)", e))?;
                }
            }
            return Ok(());
        }
        if marker.starts_with(".wh..wh.") {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not part of the image.
            return Ok(());
        }
        let victim = &marker[WHITEOUT_PREFIX.len()..];
        if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
            return Err(BuildError::entry(layer, shown, "invalid whiteout name"));
        }
        let rel = parent_rel.join(victim);
        if this_layer.contains(&rel) {
            return Ok(());
        }
        let host = self.root.join(&rel);
        fsops::remove_any(&host).map_err(|e| BuildError::io(host, "remove (whiteout)", e))
    }
}

/// Owner, mode, time and xattrs of a tar entry, with PAX overrides.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::result::Result<EntryMeta, String> {
    let h = entry.header();
    let old = h.as_old();
    // Some writers leave numeric fields empty; like GNU tar, read an empty field as 0.
    let blank = |field: &[u8]| field.iter().all(|b| *b == 0 || *b == b' ');
    let mut uid = match h.uid() {
        Err(_) if blank(&old.uid) => 0,
        other => other.map_err(|e| format!("bad uid: {e}"))?,
    };
    let mut gid = match h.gid() {
        Err(_) if blank(&old.gid) => 0,
        other => other.map_err(|e| format!("bad gid: {e}"))?,
    };
    let mode = h.mode().map_err(|e| format!("bad mode: {e}"))?;
    let mut mtime = (i64::try_from(h.mtime().unwrap_or(0)).unwrap_or(0), 0i64);
    let mut xattrs = Vec::new();
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((OsString::from(name), value.to_vec()));
            } else if key == "uid" {
                uid = parse_num(value).ok_or("bad PAX uid")?;
            } else if key == "gid" {
                gid = parse_num(value).ok_or("bad PAX gid")?;
            } else if key == "mtime" {
                let text = String::from_utf8_lossy(value);
                let (s, frac) = text.split_once('.').unwrap_or((&text, ""));
                if let Ok(sec) = s.parse::<i64>() {
                    let digits: String = frac.chars().take(9).collect();
                    let nsec = format!("{digits:0<9}").parse::<i64>().unwrap_or(0);
                    mtime = (sec, nsec);
                }
            }
        }
    }
    Ok(EntryMeta {
        uid: u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?,
        gid: u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?,
        mode,
        mtime,
        xattrs,
    })
}

fn parse_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}
