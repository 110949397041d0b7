//! The build pipeline: detect the input, look the key up in the cache, stage the root file
//! system, add the agent layout, run mkfs, and move the result into place atomically.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::cache::{Cache, KeyHasher};
use crate::error::{BuildError, Result};
use crate::image::{self, ImagePlan};
use crate::layer::LayerApplier;
use crate::mkfs::{self, Format};
use crate::progress::{Counting, LogProgress, Progress};
use crate::source::{self, Input, Store};
use crate::{BuildOptions, BuiltImage, Layout};

/// A path removed on drop unless [`TempPath::keep`] was called: no partial output survives an
/// error.
pub(crate) struct TempPath(Option<PathBuf>);

impl TempPath {
    pub(crate) fn new(path: PathBuf) -> Self {
        TempPath(Some(path))
    }
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    pub(crate) fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = crate::fsops::remove_any(&p);
        }
    }
}

/// A unique temporary sibling of `path`: `.<name>.<tag>-<pid>-<nanos>`.
pub(crate) fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// A detected input with its image plan (for OCI and docker inputs).
pub(crate) struct Resolved {
    pub input: Input,
    pub plan: Option<ImagePlan>,
}

pub(crate) fn resolve_input(from: &Path, kind: crate::InputKind) -> Result<Resolved> {
    let input = source::detect(from, kind)?;
    let plan = match &input {
        Input::Oci(store) => Some(image::oci_plan(store)?),
        Input::Docker(store) => Some(image::docker_plan(store)?),
        Input::Dir(_) | Input::Tarball(_) => None,
    };
    Ok(Resolved { input, plan })
}

/// Builds (or fetches from the cache) the image described by `opts`.
pub fn build_image(opts: &BuildOptions) -> Result<BuiltImage> {
    let progress: Arc<dyn Progress> = opts
        .progress
        .clone()
        .unwrap_or_else(|| Arc::new(LogProgress));
    let result = build_image_inner(opts, progress.as_ref());
    progress.finish();
    result
}

fn build_image_inner(opts: &BuildOptions, progress: &dyn Progress) -> Result<BuiltImage> {
    if opts.size.is_some() && opts.format == Format::Erofs {
        return Err(BuildError::Options(
            "--size applies to ext4 only (EROFS is sized by its content)".into(),
        ));
    }
    if let Layout::Agent { guest_init } = &opts.layout {
        let meta = fs::metadata(guest_init).map_err(|source| BuildError::Input {
            path: guest_init.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BuildError::UnsupportedInput {
                path: guest_init.clone(),
                reason: "guest-init must be a regular file".into(),
            });
        }
    }
    let started = Instant::now();
    let resolved = resolve_input(&opts.from, opts.input_kind)?;
    let Some(cache_dir) = &opts.cache else {
        let out = opts.out.as_ref().ok_or_else(|| {
            BuildError::Options("an output path is required without a cache".into())
        })?;
        let tmp_image = TempPath::new(sibling(out, "tmp"));
        let stage = TempPath::new(sibling(out, "stage"));
        let config = stage_and_mkfs(&resolved, opts, stage.path(), tmp_image.path(), progress)?;
        drop(stage);
        let tmp = tmp_image.keep();
        fs::rename(&tmp, out).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            BuildError::io(out, "rename into place", e)
        })?;
        progress.message(&format!(
            "built {} in {} ms",
            out.display(),
            started.elapsed().as_millis()
        ));
        return Ok(BuiltImage {
            path: out.clone(),
            cache_hit: false,
            key: None,
            size: file_len(out)?,
            config,
        });
    };
    let key = cache_key(opts, &resolved)?;
    let cache = Cache::open(cache_dir)?;
    let cached = cache.image_path(&key, opts.format.extension());
    let mut config = None;
    let hit = if cached.is_file() {
        crate::cache::touch(&cached);
        true
    } else {
        let _lock = cache.lock(&key)?;
        if cached.is_file() {
            true
        } else {
            let tmp_image = TempPath::new(
                cache
                    .tmp_dir()
                    .join(format!("{key}.{}.img", std::process::id())),
            );
            let stage = TempPath::new(
                cache
                    .tmp_dir()
                    .join(format!("{key}.{}.stage", std::process::id())),
            );
            config = stage_and_mkfs(&resolved, opts, stage.path(), tmp_image.path(), progress)?;
            drop(stage);
            fs::rename(tmp_image.path(), &cached)
                .map_err(|e| BuildError::io(&cached, "rename into cache", e))?;
            tmp_image.keep();
            false
        }
    };
    let path = match &opts.out {
        Some(out) => {
            let tmp = TempPath::new(sibling(out, "tmp"));
            mkfs::sparse_copy(&cached, tmp.path(), opts.sync_output)
                .map_err(|e| BuildError::io(tmp.path(), "copy from cache", e))?;
            fs::rename(tmp.path(), out).map_err(|e| BuildError::io(out, "rename into place", e))?;
            tmp.keep();
            out.clone()
        }
        None => cached,
    };
    progress.message(&format!(
        "{} {} in {} ms (key {})",
        if hit { "cache hit:" } else { "built" },
        path.display(),
        started.elapsed().as_millis(),
        &key[..12]
    ));
    Ok(BuiltImage {
        size: file_len(&path)?,
        path,
        cache_hit: hit,
        key: Some(key),
        config,
    })
}

fn file_len(path: &Path) -> Result<u64> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| BuildError::io(path, "stat", e))
}

/// The cache key: builder version, every option that changes the image, the guest-init file and
/// the input's identity (manifest digest for OCI layouts, config digest for docker archives, file
/// metadata for tarballs, a metadata walk for directories).
fn cache_key(opts: &BuildOptions, resolved: &Resolved) -> Result<String> {
    let mut h = KeyHasher::new();
    h.field("format", opts.format.extension());
    h.field("size", opts.size.unwrap_or(0).to_le_bytes());
    h.field(
        "erofs-compression",
        opts.erofs_compression.as_deref().unwrap_or(""),
    );
    match &opts.layout {
        Layout::Plain => h.field("layout", "plain"),
        Layout::Agent { guest_init } => {
            h.field("layout", "agent");
            h.file_identity("guest-init", guest_init)
                .map_err(|source| BuildError::Input {
                    path: guest_init.clone(),
                    source,
                })?;
        }
    }
    let from = &opts.from;
    let input_err = |source| BuildError::Input {
        path: from.clone(),
        source,
    };
    match (&resolved.input, &resolved.plan) {
        (_, Some(plan)) => h.field("image", &plan.identity),
        (Input::Tarball(p), None) => h.file_identity("tarball", p).map_err(input_err)?,
        (Input::Dir(p), None) => h.tree_identity(p).map_err(input_err)?,
        (Input::Oci(_) | Input::Docker(_), None) => unreachable!("images always have a plan"),
    }
    Ok(h.finish())
}

/// Stages the input and writes the image to `image`; returns the image config if any.
fn stage_and_mkfs(
    resolved: &Resolved,
    opts: &BuildOptions,
    stage: &Path,
    image: &Path,
    progress: &dyn Progress,
) -> Result<Option<crate::ImageConfig>> {
    if let (Input::Dir(src), Layout::Plain) = (&resolved.input, &opts.layout) {
        // Nothing to add or change: mkfs reads the directory itself, no staging copy.
        make_image(
            src,
            image,
            opts.format,
            opts.size,
            opts.erofs_compression.as_deref(),
            progress,
        )?;
        return Ok(None);
    }
    let container_root = prepare_layout(stage, &opts.layout)?;
    populate(resolved, &container_root, progress)?;
    finish_layout(stage, &opts.layout)?;
    make_image(
        stage,
        image,
        opts.format,
        opts.size,
        opts.erofs_compression.as_deref(),
        progress,
    )?;
    Ok(resolved.plan.as_ref().map(|p| p.config.clone()))
}

pub(crate) fn make_image(
    stage: &Path,
    image: &Path,
    format: Format,
    size: Option<u64>,
    compression: Option<&str>,
    progress: &dyn Progress,
) -> Result<u64> {
    let t = Instant::now();
    let bytes = match format {
        Format::Ext4 => {
            let stats = mkfs::tree_stats(stage).map_err(|e| BuildError::io(stage, "measure", e))?;
            progress.message(&format!(
                "mkfs.ext4: {} MiB of content, {} inodes",
                stats.bytes >> 20,
                stats.inodes
            ));
            mkfs::make_ext4(stage, image, size, &stats)?
        }
        Format::Erofs => {
            progress.message("mkfs.erofs");
            mkfs::make_erofs(stage, image, compression)?
        }
    };
    // The image is renamed into place next: make its contents durable first.
    fs::File::open(image)
        .and_then(|f| f.sync_all())
        .map_err(|e| BuildError::io(image, "fsync", e))?;
    progress.message(&format!(
        "{} image: {} bytes, mkfs took {} ms",
        format.extension(),
        bytes,
        t.elapsed().as_millis()
    ));
    Ok(bytes)
}

/// Creates the staging root; returns where the container's files go.
pub(crate) fn prepare_layout(stage: &Path, layout: &Layout) -> Result<PathBuf> {
    fs::create_dir(stage).map_err(|e| BuildError::io(stage, "create staging directory", e))?;
    fs::set_permissions(stage, fs::Permissions::from_mode(0o755))
        .map_err(|e| BuildError::io(stage, "chmod", e))?;
    match layout {
        Layout::Plain => Ok(stage.to_path_buf()),
        Layout::Agent { .. } => {
            let root = stage.join(crate::CONTAINER_ROOT.trim_start_matches('/'));
            crate::fsops::create_dir_default(&root)
                .map_err(|e| BuildError::io(&root, "mkdir", e))?;
            Ok(root)
        }
    }
}

/// Adds the agent and its mount points (agent layout).
pub(crate) fn finish_layout(stage: &Path, layout: &Layout) -> Result<()> {
    let Layout::Agent { guest_init } = layout else {
        return Ok(());
    };
    for (dir, mode) in [
        ("kiln", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = stage.join(dir);
        fs::create_dir(&p).map_err(|e| BuildError::io(&p, "mkdir", e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .map_err(|e| BuildError::io(&p, "chmod", e))?;
    }
    let target = stage.join(crate::GUEST_INIT_PATH.trim_start_matches('/'));
    fs::copy(guest_init, &target).map_err(|e| BuildError::io(guest_init, "copy guest-init", e))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(|e| BuildError::io(&target, "chmod", e))?;
    Ok(())
}

/// Fills `root` with the container's files.
pub(crate) fn populate(resolved: &Resolved, root: &Path, progress: &dyn Progress) -> Result<()> {
    match (&resolved.input, &resolved.plan) {
        (Input::Dir(src), _) => {
            progress.message(&format!("copying {}", src.display()));
            crate::copy::copy_tree(src, root)
        }
        (Input::Tarball(path), _) => {
            progress.message(&format!("unpacking {}", path.display()));
            let file = fs::File::open(path).map_err(|source| BuildError::Input {
                path: path.clone(),
                source,
            })?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let shown = path.display().to_string();
            let mut reader = crate::compress::auto_decoder(Counting::new(file, len, progress))
                .map_err(|source| BuildError::LayerRead {
                    layer: shown.clone(),
                    source,
                })?;
            let mut applier = LayerApplier::new(root);
            applier.apply(&shown, &mut reader, false)?;
            drain(&mut reader, &shown)?;
            applier.finish()
        }
        (Input::Oci(store) | Input::Docker(store), Some(plan)) => {
            apply_layers(store, plan, root, progress)
        }
        (Input::Oci(_) | Input::Docker(_), None) => unreachable!("images always have a plan"),
    }
}

/// Reads a layer stream to its end: trailing data after the tar end marker is still checked
/// (gzip CRC, zstd checksum, diff_id).
fn drain(reader: &mut dyn Read, layer: &str) -> Result<()> {
    io::copy(reader, &mut io::sink())
        .map(|_| ())
        .map_err(|source| BuildError::LayerRead {
            layer: layer.to_string(),
            source,
        })
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn apply_layers(
    store: &Store,
    plan: &ImagePlan,
    root: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let mut applier = LayerApplier::new(root);
    let count = plan.layers.len();
    for (i, layer) in plan.layers.iter().enumerate() {
        let shown = store.display(&layer.member).display().to_string();
        let short = layer.member.rsplit('/').next().unwrap_or(&layer.member);
        let short: String = short.chars().take(12).collect();
        if let Some((digest, size)) = &layer.blob {
            progress.message(&format!("verifying layer {}/{count} {short}", i + 1));
            image::verify_blob(store, digest, *size)?;
        }
        progress.message(&format!("applying layer {}/{count} {short}", i + 1));
        let (reader, len) = store.open(&layer.member)?;
        let decoder = crate::compress::auto_decoder(Counting::new(reader, len, progress)).map_err(
            |source| BuildError::LayerRead {
                layer: shown.clone(),
                source,
            },
        )?;
        let mut hashing = Hashing {
            inner: decoder,
            hasher: Sha256::new(),
        };
        applier.apply(&shown, &mut hashing, true)?;
        drain(&mut hashing, &shown)?;
        if let Some(diff_id) = &layer.diff_id {
            let actual = format!("sha256:{}", image::hex(&hashing.hasher.finalize()));
            if &actual != diff_id {
                return Err(BuildError::DigestMismatch {
                    path: PathBuf::from(shown),
                    digest: diff_id.clone(),
                    reason: format!("uncompressed layer hashes to {actual}"),
                });
            }
        }
    }
    log::debug!("applied {count} layers from {}", store.path().display());
    applier.finish()
}
