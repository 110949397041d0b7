//! The error type of the library: one enum, one variant per kind of failure, each naming the file
//! (and, for layers, the layer and entry) that caused it.

use std::path::PathBuf;

/// Everything that can go wrong while building an image or a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The input path does not exist or cannot be read.
    #[error("{path}: cannot read input")]
    Input {
        /// The input path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The input is not something rootfs-builder understands.
    #[error("{path}: {reason}")]
    UnsupportedInput {
        /// The input path.
        path: PathBuf,
        /// Why it is not supported.
        reason: String,
    },
    /// A manifest, index or config is malformed.
    #[error("{path}: invalid {what}: {reason}")]
    Malformed {
        /// The file (or archive member) that is malformed.
        path: PathBuf,
        /// What was being parsed (`index.json`, `manifest`, `config`...).
        what: &'static str,
        /// The parse error.
        reason: String,
    },
    /// A blob's content does not match its descriptor.
    #[error("{path}: digest mismatch for {digest}: {reason}")]
    DigestMismatch {
        /// The blob file.
        path: PathBuf,
        /// The expected digest.
        digest: String,
        /// What differed (size or hash, with the actual value).
        reason: String,
    },
    /// A layer or blob has a media type we do not know how to unpack.
    #[error("{path}: unknown media type {media_type:?} for {digest}")]
    UnknownMediaType {
        /// The manifest that names it.
        path: PathBuf,
        /// The media type.
        media_type: String,
        /// The digest of the descriptor.
        digest: String,
    },
    /// No manifest for linux/amd64.
    #[error("{path}: unsupported architecture: no linux/amd64 image (found {found})")]
    UnsupportedArchitecture {
        /// The index or config.
        path: PathBuf,
        /// The platforms that were found.
        found: String,
    },
    /// A layer entry is unsafe or cannot be applied.
    #[error("{layer}: entry {entry:?}: {reason}")]
    LayerEntry {
        /// The layer (file, or archive member).
        layer: String,
        /// The entry path as written in the layer.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or decompressing a layer failed (corrupt gzip/zstd/tar).
    #[error("{layer}: cannot read layer")]
    LayerRead {
        /// The layer.
        layer: String,
        /// The I/O or decompression error.
        #[source]
        source: std::io::Error,
    },
    /// A file-system operation on the staging tree or output failed.
    #[error("{path}: {op}")]
    Io {
        /// The path operated on.
        path: PathBuf,
        /// The operation (`create`, `rename`...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` or `mkfs.erofs` failed.
    #[error("{tool} failed for {path}: {message}")]
    Mkfs {
        /// The tool that failed.
        tool: &'static str,
        /// The image being written.
        path: PathBuf,
        /// Its exit status and stderr.
        message: String,
    },
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    Options(String),
}

impl BuildError {
    /// Shorthand for [`BuildError::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        BuildError::Io {
            path: path.into(),
            op,
            source,
        }
    }

    /// Shorthand for [`BuildError::LayerEntry`].
    pub(crate) fn entry(layer: &str, entry: impl Into<String>, reason: impl Into<String>) -> Self {
        BuildError::LayerEntry {
            layer: layer.to_string(),
            entry: entry.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = BuildError> = std::result::Result<T, E>;
