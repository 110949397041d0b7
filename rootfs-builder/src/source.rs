//! Input detection and blob access. An input is a plain directory, a plain (optionally gzip or
//! zstd compressed) rootfs tarball, or an image: an OCI layout directory, an `oci-archive` or a
//! `docker-archive` tarball. Archives are never unpacked to disk: their members are indexed once
//! (header scan with seeks) and read in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::compress::{self, Compression};
use crate::error::{BuildError, Result};

/// What kind of input the user gave, or `Auto` to detect it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputKind {
    /// Detect from the file type and contents.
    #[default]
    Auto,
    /// A directory holding the root file system.
    Dir,
    /// A tarball of the root file system (plain, gzip or zstd).
    Tarball,
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).
    OciLayout,
    /// A tar archive of an OCI image layout.
    OciArchive,
    /// A `docker save` / `podman save --format docker-archive` tarball.
    DockerArchive,
}

/// A detected input.
pub enum Input {
    /// A root file system directory.
    Dir(PathBuf),
    /// A root file system tarball.
    Tarball(PathBuf),
    /// An OCI layout (directory or archive); blobs come from the store.
    Oci(Store),
    /// A docker-archive.
    Docker(Store),
}

/// Where the members of an image live: a directory, or the members of an uncompressed tar file.
pub enum Store {
    /// Files under a directory.
    Dir(PathBuf),
    /// Members of a tar archive, by normalised path.
    Tar {
        /// The archive.
        path: PathBuf,
        /// Data offset and size of each regular member.
        members: HashMap<String, (u64, u64)>,
    },
}

/// Members larger than this are never read into memory (manifests, configs, index.json).
pub const MAX_JSON: u64 = 16 << 20;

impl Store {
    /// How a member is named in messages: `dir/member` or `archive.tar:member`.
    pub fn display(&self, member: &str) -> PathBuf {
        match self {
            Store::Dir(d) => d.join(member),
            Store::Tar { path, .. } => PathBuf::from(format!("{}:{member}", path.display())),
        }
    }

    /// The store's own path (directory or archive).
    pub fn path(&self) -> &Path {
        match self {
            Store::Dir(d) => d,
            Store::Tar { path, .. } => path,
        }
    }

    /// Opens a member for reading; returns the reader and the member's size.
    pub fn open(&self, member: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let shown = self.display(member);
        let not_found = || BuildError::UnsupportedInput {
            path: shown.clone(),
            reason: "missing from the image".into(),
        };
        match self {
            Store::Dir(d) => {
                let rel = safe_member(member).ok_or_else(not_found)?;
                let path = d.join(rel);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => not_found(),
                    _ => BuildError::io(&path, "open", e),
                })?;
                let len = file
                    .metadata()
                    .map_err(|e| BuildError::io(&path, "stat", e))?
                    .len();
                Ok((Box::new(file), len))
            }
            Store::Tar { path, members } => {
                let key = member_key(Path::new(member)).ok_or_else(not_found)?;
                let (offset, size) = *members.get(&key).ok_or_else(not_found)?;
                let mut file = File::open(path).map_err(|e| BuildError::io(path, "open", e))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| BuildError::io(path, "seek", e))?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Reads a small member (JSON) completely, refusing members larger than [`MAX_JSON`].
    pub fn read_small(&self, member: &str) -> Result<Vec<u8>> {
        let (reader, len) = self.open(member)?;
        if len > MAX_JSON {
            return Err(BuildError::UnsupportedInput {
                path: self.display(member),
                reason: format!("{len} bytes is too large for a manifest or config"),
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        reader
            .take(MAX_JSON)
            .read_to_end(&mut buf)
            .map_err(|e| BuildError::io(self.display(member), "read", e))?;
        Ok(buf)
    }
}

/// A member path that is relative and has no `..`, or None.
fn safe_member(member: &str) -> Option<PathBuf> {
    let p = Path::new(member);
    p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| p.to_path_buf())
}

/// Normalises an archive member name (`./a//b` → `a/b`); None for names with `..` or absolute.
fn member_key(p: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

/// Indexes the members of an uncompressed tar archive (regular files; symlinks and hard links to
/// them are resolved, as `docker save` writes duplicate layers as symlinks).
fn index_tar(path: &Path) -> io::Result<HashMap<String, (u64, u64)>> {
    let file = File::open(path)?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let Some(key) = member_key(&entry.path()?) else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_file() {
            members.insert(key, (entry.raw_file_position(), entry.size()));
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name()? else {
                continue;
            };
            let joined = if kind.is_symlink() {
                Path::new(&key)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(&target)
            } else {
                target.into_owned()
            };
            // Resolve `..` lexically, staying inside the archive.
            let mut parts: Vec<String> = Vec::new();
            let mut ok = true;
            for c in joined.components() {
                match c {
                    Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
                    Component::ParentDir => ok &= parts.pop().is_some(),
                    Component::CurDir => {}
                    _ => ok = false,
                }
            }
            if ok {
                links.push((key, parts.join("/")));
            }
        }
    }
    for _ in 0..8 {
        let mut changed = false;
        for (key, target) in &links {
            if !members.contains_key(key) {
                if let Some(v) = members.get(target).copied() {
                    members.insert(key.clone(), v);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    Ok(members)
}

/// Detects what `path` is (or checks it is what `kind` says).
pub fn detect(path: &Path, kind: InputKind) -> Result<Input> {
    let meta = std::fs::metadata(path).map_err(|source| BuildError::Input {
        path: path.to_path_buf(),
        source,
    })?;
    let unsupported = |reason: &str| BuildError::UnsupportedInput {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if meta.is_dir() {
        let is_oci = path.join("oci-layout").is_file() && path.join("index.json").is_file();
        let version = std::fs::read(path.join("version")).unwrap_or_default();
        if !is_oci && kind == InputKind::Auto && version.starts_with(b"Directory Transport Version")
        {
            return Err(unsupported(
                "a containers/image `dir:` (docker-dir) copy is not supported; save as oci-dir, oci-archive or docker-archive",
            ));
        }
        return match kind {
            InputKind::Auto if is_oci => Ok(Input::Oci(Store::Dir(path.to_path_buf()))),
            InputKind::Auto | InputKind::Dir => Ok(Input::Dir(path.to_path_buf())),
            InputKind::OciLayout if is_oci => Ok(Input::Oci(Store::Dir(path.to_path_buf()))),
            InputKind::OciLayout => {
                Err(unsupported("not an OCI layout (no oci-layout/index.json)"))
            }
            _ => Err(unsupported("is a directory, not an archive")),
        };
    }
    if !meta.is_file() {
        return Err(unsupported("not a regular file or directory"));
    }
    let mut head = [0u8; 512];
    let n = read_up_to(path, &mut head).map_err(|source| BuildError::Input {
        path: path.to_path_buf(),
        source,
    })?;
    let compression = compress::detect(&head[..n]).map_err(|r| unsupported(&r))?;
    if compression != Compression::None {
        return match kind {
            InputKind::Auto | InputKind::Tarball => Ok(Input::Tarball(path.to_path_buf())),
            _ => Err(unsupported(
                "compressed archives must be plain rootfs tarballs",
            )),
        };
    }
    if !compress::looks_like_tar(&head[..n]) {
        return Err(unsupported(
            "not a directory, tar archive, gzip or zstd stream",
        ));
    }
    if kind == InputKind::Tarball {
        return Ok(Input::Tarball(path.to_path_buf()));
    }
    let members = index_tar(path).map_err(|e| unsupported(&format!("corrupt tar archive: {e}")))?;
    let is_oci = members.contains_key("oci-layout") && members.contains_key("index.json");
    let is_docker = members.contains_key("manifest.json");
    let store = Store::Tar {
        path: path.to_path_buf(),
        members,
    };
    match kind {
        InputKind::Auto if is_oci => Ok(Input::Oci(store)),
        InputKind::Auto if is_docker => Ok(Input::Docker(store)),
        InputKind::Auto => Ok(Input::Tarball(path.to_path_buf())),
        InputKind::OciArchive if is_oci => Ok(Input::Oci(store)),
        InputKind::DockerArchive if is_docker => Ok(Input::Docker(store)),
        InputKind::OciArchive => Err(unsupported("not an oci-archive (no oci-layout/index.json)")),
        InputKind::DockerArchive => Err(unsupported("not a docker-archive (no manifest.json)")),
        _ => Err(unsupported("is a file, not a directory")),
    }
}

fn read_up_to(path: &Path, buf: &mut [u8]) -> io::Result<usize> {
    let mut file = File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
