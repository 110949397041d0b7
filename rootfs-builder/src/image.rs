//! Reading container images: OCI index → (nested indexes) → linux/amd64 manifest → config and
//! layers, or a docker-archive's `manifest.json`. Every blob is checked against its descriptor
//! (size and sha256) before use; docker-archive layers are checked against the config's
//! `diff_ids` while they are unpacked.

use std::io::Read;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};
use crate::source::Store;

/// The only platform kiln runs.
pub const OS: &str = "linux";
/// The only architecture kiln runs.
pub const ARCH: &str = "amd64";

const MAX_INDEX_DEPTH: usize = 8;

/// An OCI content descriptor (the fields we use).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `algorithm:hex`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform (in indexes).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The image configuration (the parts a runtime bundle needs).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// Execution parameters.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// Layer diff ids.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// Execution parameters of an image.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// `NAME=value` list.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    /// sha256 of each uncompressed layer.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// Member path in the store.
    pub member: String,
    /// Blob digest and size to verify before unpacking (OCI).
    pub blob: Option<(String, u64)>,
    /// Digest of the uncompressed tar to verify while unpacking (docker-archive).
    pub diff_id: Option<String>,
}

/// A resolved image: what to unpack and its configuration.
pub struct ImagePlan {
    /// Content identity for the cache (manifest digest, or sha256 of a docker-archive's config).
    pub identity: String,
    /// The image configuration.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
}

/// `blobs/sha256/<hex>` for a digest, refusing anything that is not a well-formed sha256.
pub fn blob_member(store: &Store, digest: &str) -> Result<String> {
    let bad = |reason: &str| BuildError::Malformed {
        path: store.path().to_path_buf(),
        what: "digest",
        reason: format!("{digest:?}: {reason}"),
    };
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad("missing algorithm"))?;
    if alg != "sha256" {
        return Err(bad("only sha256 digests are supported"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad("not 64 lowercase hex digits"));
    }
    Ok(format!("blobs/sha256/{hex}"))
}

/// Streams a blob and checks its size and sha256 against the descriptor.
pub fn verify_blob(store: &Store, digest: &str, size: u64) -> Result<()> {
    let member = blob_member(store, digest)?;
    let (reader, actual_len) = store.open(&member)?;
    let shown = store.display(&member);
    if actual_len != size {
        return Err(BuildError::DigestMismatch {
            path: shown,
            digest: digest.into(),
            reason: format!("size is {actual_len} bytes, descriptor says {size}"),
        });
    }
    let actual = sha256_reader(reader).map_err(|e| BuildError::io(&shown, "read", e))?;
    if format!("sha256:{actual}") != digest {
        return Err(BuildError::DigestMismatch {
            path: shown,
            digest: digest.into(),
            reason: format!("content hashes to sha256:{actual}"),
        });
    }
    Ok(())
}

/// Hex sha256 of everything `reader` yields.
pub fn sha256_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_verified(store: &Store, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
    let member = blob_member(store, &desc.digest)?;
    if desc.size > max {
        return Err(BuildError::UnsupportedInput {
            path: store.display(&member),
            reason: format!("{} bytes is too large for a manifest or config", desc.size),
        });
    }
    let data = store.read_small(&member)?;
    let actual = hex(&Sha256::digest(&data));
    if data.len() as u64 != desc.size || format!("sha256:{actual}") != desc.digest {
        return Err(BuildError::DigestMismatch {
            path: store.display(&member),
            digest: desc.digest.clone(),
            reason: format!("got {} bytes hashing to sha256:{actual}", data.len()),
        });
    }
    Ok(data)
}

fn parse<T: for<'de> Deserialize<'de>>(
    store: &Store,
    member: &str,
    what: &'static str,
    data: &[u8],
) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| BuildError::Malformed {
        path: store.display(member),
        what,
        reason: e.to_string(),
    })
}

fn is_index(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.index.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.manifest.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.v2+json"
}

/// Accepted layer media types (compression is detected from the bytes).
fn is_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

fn is_config(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.config.v1+json"
        || media_type == "application/vnd.docker.container.image.v1+json"
}

fn platform_name(p: &Option<Platform>) -> String {
    match p {
        Some(p) => format!("{}/{}", p.os, p.architecture),
        None => "unspecified".into(),
    }
}

/// Finds the linux/amd64 manifest descriptor in an index, following nested indexes.
fn select_manifest(
    store: &Store,
    member: &str,
    index: Index,
    depth: usize,
    found: &mut Vec<String>,
) -> Result<Option<Descriptor>> {
    for desc in index.manifests {
        if is_index(&desc.media_type) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(BuildError::Malformed {
                    path: store.display(member),
                    what: "index",
                    reason: "indexes nested too deeply".into(),
                });
            }
            let nested_member = blob_member(store, &desc.digest)?;
            let data = read_verified(store, &desc, crate::source::MAX_JSON)?;
            let nested: Index = parse(store, &nested_member, "index", &data)?;
            if let Some(d) = select_manifest(store, &nested_member, nested, depth + 1, found)? {
                return Ok(Some(d));
            }
            continue;
        }
        if !desc.media_type.is_empty() && !is_manifest(&desc.media_type) {
            found.push(format!(
                "{} ({})",
                platform_name(&desc.platform),
                desc.media_type
            ));
            continue;
        }
        match &desc.platform {
            Some(p) if p.os != OS || p.architecture != ARCH => {
                found.push(platform_name(&desc.platform))
            }
            _ => return Ok(Some(desc)),
        }
    }
    Ok(None)
}

fn check_arch(store: &Store, member: &str, config: &ImageConfig) -> Result<()> {
    let os_ok = config.os.is_empty() || config.os == OS;
    let arch_ok = config.architecture.is_empty() || config.architecture == ARCH;
    if os_ok && arch_ok {
        return Ok(());
    }
    Err(BuildError::UnsupportedArchitecture {
        path: store.display(member),
        found: format!("{}/{}", config.os, config.architecture),
    })
}

/// Resolves an OCI layout (directory or archive).
pub fn oci_plan(store: &Store) -> Result<ImagePlan> {
    let index_data = store.read_small("index.json")?;
    let index: Index = parse(store, "index.json", "index.json", &index_data)?;
    let mut found = Vec::new();
    let desc = select_manifest(store, "index.json", index, 0, &mut found)?.ok_or_else(|| {
        BuildError::UnsupportedArchitecture {
            path: store.display("index.json"),
            found: if found.is_empty() {
                "no manifests".into()
            } else {
                found.join(", ")
            },
        }
    })?;
    let manifest_member = blob_member(store, &desc.digest)?;
    let data = read_verified(store, &desc, crate::source::MAX_JSON)?;
    let manifest: Manifest = parse(store, &manifest_member, "manifest", &data)?;
    if !manifest.media_type.is_empty() && !is_manifest(&manifest.media_type) {
        return Err(BuildError::UnknownMediaType {
            path: store.display(&manifest_member),
            media_type: manifest.media_type,
            digest: desc.digest,
        });
    }
    if !is_config(&manifest.config.media_type) {
        return Err(BuildError::UnknownMediaType {
            path: store.display(&manifest_member),
            media_type: manifest.config.media_type.clone(),
            digest: manifest.config.digest.clone(),
        });
    }
    let config_member = blob_member(store, &manifest.config.digest)?;
    let config_data = read_verified(store, &manifest.config, crate::source::MAX_JSON)?;
    let config: ImageConfig = parse(store, &config_member, "config", &config_data)?;
    check_arch(store, &config_member, &config)?;
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        if !is_layer(&layer.media_type) {
            return Err(BuildError::UnknownMediaType {
                path: store.display(&manifest_member),
                media_type: layer.media_type.clone(),
                digest: layer.digest.clone(),
            });
        }
        layers.push(LayerRef {
            member: blob_member(store, &layer.digest)?,
            blob: Some((layer.digest.clone(), layer.size)),
            diff_id: None,
        });
    }
    Ok(ImagePlan {
        identity: desc.digest,
        config,
        layers,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// Resolves a docker-archive.
pub fn docker_plan(store: &Store) -> Result<ImagePlan> {
    let data = store.read_small("manifest.json")?;
    let entries: Vec<DockerManifestEntry> = parse(store, "manifest.json", "manifest.json", &data)?;
    if entries.len() > 1 {
        log::warn!(
            "{}: {} images in the archive, using the first",
            store.path().display(),
            entries.len()
        );
    }
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| BuildError::Malformed {
            path: store.display("manifest.json"),
            what: "manifest.json",
            reason: "no images listed".into(),
        })?;
    let config_data = store.read_small(&entry.config)?;
    let actual = hex(&Sha256::digest(&config_data));
    // Config members are named after their digest (`<hex>.json`, `blobs/sha256/<hex>`).
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && stem != actual {
        return Err(BuildError::DigestMismatch {
            path: store.display(&entry.config),
            digest: format!("sha256:{stem}"),
            reason: format!("content hashes to sha256:{actual}"),
        });
    }
    let config: ImageConfig = parse(store, &entry.config, "config", &config_data)?;
    check_arch(store, &entry.config, &config)?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(BuildError::Malformed {
            path: store.display(&entry.config),
            what: "config",
            reason: format!(
                "{} diff_ids for {} layers",
                diff_ids.len(),
                entry.layers.len()
            ),
        });
    }
    let layers = entry
        .layers
        .into_iter()
        .zip(diff_ids)
        .map(|(member, diff_id)| LayerRef {
            member,
            blob: None,
            diff_id: Some(diff_id),
        })
        .collect();
    Ok(ImagePlan {
        identity: format!("sha256:{actual}"),
        config,
        layers,
    })
}
