//! OCI runtime bundles: `config.json` generated from the image configuration (entrypoint + cmd,
//! env, working directory, user resolved through the image's `/etc/passwd` and `/etc/group`),
//! the `rootfs/` directory, and the block image (`rootfs.ext4` or `rootfs.erofs`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::runtime::{Process, Root, Spec, User};

use crate::error::{BuildError, Result};
use crate::fsops::{self, Missing};
use crate::image::ImageConfig;
use crate::mkfs::Format;
use crate::pipeline::{self, TempPath};
use crate::progress::{LogProgress, Progress};
use crate::{InputKind, Layout};

/// Default `PATH` when the image sets none (as Docker and podman do).
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `/etc/passwd` and `/etc/group` larger than this are refused.
const MAX_DB: u64 = 4 << 20;

/// What bundle to build.
#[derive(Clone)]
pub struct BundleOptions {
    /// The image (any input [`crate::build_image`] accepts).
    pub image: PathBuf,
    /// Input kind, normally [`InputKind::Auto`].
    pub input_kind: InputKind,
    /// The bundle directory (created; if it exists it must be empty).
    pub out_dir: PathBuf,
    /// Block image format.
    pub format: Format,
    /// ext4 size, or automatic.
    pub size: Option<u64>,
    /// Block image layout.
    pub layout: Layout,
    /// EROFS compressor.
    pub erofs_compression: Option<String>,
    /// Replaces the image's `Cmd` (the entrypoint is kept), like `podman run IMAGE ARGS...`.
    pub args: Option<Vec<String>>,
    /// Progress reporter; `None` uses `log`.
    pub progress: Option<Arc<dyn Progress>>,
}

/// A finished bundle.
#[derive(Debug)]
pub struct BuiltBundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The generated runtime spec (also written to `config.json`).
    pub spec: Spec,
    /// The block image inside the bundle.
    pub image: PathBuf,
}

/// Builds an OCI runtime bundle from an image. Nothing is left behind on error.
pub fn build_bundle(opts: &BundleOptions) -> Result<BuiltBundle> {
    let progress: Arc<dyn Progress> = opts
        .progress
        .clone()
        .unwrap_or_else(|| Arc::new(LogProgress));
    let result = build_bundle_inner(opts, progress.as_ref());
    progress.finish();
    result
}

fn build_bundle_inner(opts: &BundleOptions, progress: &dyn Progress) -> Result<BuiltBundle> {
    let out = &opts.out_dir;
    if opts.size.is_some() && opts.format == Format::Erofs {
        return Err(BuildError::Options("--size applies to ext4 only".into()));
    }
    let created_dir = match fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BuildError::UnsupportedInput {
                    path: out.clone(),
                    reason: "bundle directory exists and is not empty".into(),
                });
            }
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(out).map_err(|e| BuildError::io(out, "create bundle directory", e))?;
            Some(TempPath::new(out.clone()))
        }
        Err(e) => return Err(BuildError::io(out, "read bundle directory", e)),
    };
    let resolved = pipeline::resolve_input(&opts.image, opts.input_kind)?;
    let stage = TempPath::new(out.join(format!(".kiln-stage-{}", std::process::id())));
    let container_root = pipeline::prepare_layout(stage.path(), &opts.layout)?;
    pipeline::populate(&resolved, &container_root, progress)?;
    let config = resolved
        .plan
        .as_ref()
        .map(|p| p.config.clone())
        .unwrap_or_default();
    let spec = generate_spec(&config, &container_root, opts.args.as_deref(), &opts.image)?;
    pipeline::finish_layout(stage.path(), &opts.layout)?;

    let image_name = format!("rootfs.{}", opts.format.extension());
    let image = out.join(&image_name);
    let tmp_image = TempPath::new(out.join(format!(".{image_name}.tmp")));
    pipeline::make_image(
        stage.path(),
        tmp_image.path(),
        opts.format,
        opts.size,
        opts.erofs_compression.as_deref(),
        progress,
    )?;
    let rootfs_dir = TempPath::new(out.join("rootfs"));
    fs::rename(&container_root, rootfs_dir.path())
        .map_err(|e| BuildError::io(rootfs_dir.path(), "rename rootfs into place", e))?;
    let config_tmp = TempPath::new(out.join(".config.json.tmp"));
    let json = serde_json::to_vec_pretty(&spec)
        .map_err(|e| BuildError::Options(format!("cannot serialise config.json: {e}")))?;
    fs::write(config_tmp.path(), json)
        .map_err(|e| BuildError::io(config_tmp.path(), "write", e))?;
    let config_path = out.join("config.json");
    fs::rename(config_tmp.path(), &config_path)
        .map_err(|e| BuildError::io(&config_path, "rename into place", e))?;
    config_tmp.keep();
    fs::rename(tmp_image.path(), &image)
        .map_err(|e| BuildError::io(&image, "rename into place", e))?;
    tmp_image.keep();
    rootfs_dir.keep();
    drop(stage);
    if let Some(dir) = created_dir {
        dir.keep();
    }
    progress.message(&format!("bundle ready in {}", out.display()));
    Ok(BuiltBundle {
        dir: out.clone(),
        spec,
        image,
    })
}

/// Builds the runtime spec for an image whose files are at `root`.
pub(crate) fn generate_spec(
    config: &ImageConfig,
    root: &Path,
    args_override: Option<&[String]>,
    image: &Path,
) -> Result<Spec> {
    let c = config.config.clone().unwrap_or_default();
    let mut args: Vec<String> = c.entrypoint.clone().unwrap_or_default();
    match args_override {
        Some(a) if !a.is_empty() => args.extend(a.iter().cloned()),
        _ => args.extend(c.cmd.clone().unwrap_or_default()),
    }
    if args.is_empty() {
        return Err(BuildError::UnsupportedInput {
            path: image.to_path_buf(),
            reason: "the image has no Entrypoint or Cmd; give the command to run".into(),
        });
    }
    let mut env = c.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let cwd = match c.working_dir.as_deref() {
        None | Some("") => "/".to_string(),
        Some(w) if w.starts_with('/') => w.to_string(),
        Some(w) => format!("/{w}"),
    };
    let user = resolve_user(root, c.user.as_deref().unwrap_or(""))?;

    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_else(Process::default);
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    process.set_user(user);
    spec.set_process(Some(process));
    let mut root_cfg = Root::default();
    root_cfg.set_path(PathBuf::from("rootfs"));
    root_cfg.set_readonly(Some(false));
    spec.set_root(Some(root_cfg));
    spec.set_hostname(Some("kiln".to_string()));
    Ok(spec)
}

/// Reads a file of the image (`etc/passwd`), resolving symlinks inside the root. Missing → None.
fn read_image_file(root: &Path, rel: &str) -> Result<Option<String>> {
    let parts = fsops::normalize(Path::new(rel)).map_err(BuildError::Options)?;
    let real = match fsops::resolve(root, &parts, true, Missing::Fail) {
        Ok(r) => r,
        Err(fsops::ResolveError::NotFound(_)) => return Ok(None),
        Err(e) => {
            return Err(BuildError::UnsupportedInput {
                path: PathBuf::from(format!("/{rel}")),
                reason: e.to_string(),
            })
        }
    };
    let path = root.join(fsops::join(&real));
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BuildError::io(path, "open", e)),
    };
    let mut text = String::new();
    file.take(MAX_DB)
        .read_to_string(&mut text)
        .map_err(|e| BuildError::io(&path, "read", e))?;
    Ok(Some(text))
}

/// Resolves an image `User` (`""`, `uid`, `name`, `uid:gid`, `name:group`) to numeric ids, with
/// supplementary groups from `/etc/group`.
pub(crate) fn resolve_user(root: &Path, spec: &str) -> Result<User> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_image_file(root, "etc/passwd")?.unwrap_or_default();
    let group = read_image_file(root, "etc/group")?.unwrap_or_default();
    let passwd_rows: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let group_rows: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 3)
        .collect();

    let user_not_found = |what: &str, name: &str, file: &str| BuildError::UnsupportedInput {
        path: PathBuf::from(file),
        reason: format!("{what} {name:?} from the image config is not in the image's {file}"),
    };
    let (uid, name, passwd_gid) = if user_part.is_empty() {
        (0, Some("root".to_string()), Some(0))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        let row = passwd_rows
            .iter()
            .find(|r| r[2].parse::<u32>().ok() == Some(uid));
        (
            uid,
            row.map(|r| r[0].to_string()),
            row.and_then(|r| r[3].parse().ok()),
        )
    } else {
        let row = passwd_rows
            .iter()
            .find(|r| r[0] == user_part)
            .ok_or_else(|| user_not_found("user", user_part, "/etc/passwd"))?;
        let uid = row[2]
            .parse()
            .map_err(|_| user_not_found("user", user_part, "/etc/passwd"))?;
        (uid, Some(user_part.to_string()), row[3].parse().ok())
    };
    let gid = match group_part {
        None | Some("") => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_rows
                .iter()
                .find(|r| r[0] == g)
                .and_then(|r| r[2].parse().ok())
                .ok_or_else(|| user_not_found("group", g, "/etc/group"))?,
        },
    };
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        for row in &group_rows {
            let members = row.get(3).copied().unwrap_or("");
            if members.split(',').any(|m| m == name) {
                if let Ok(g) = row[2].parse::<u32>() {
                    if g != gid && !additional.contains(&g) {
                        additional.push(g);
                    }
                }
            }
        }
    }
    let mut user = User::default();
    user.set_uid(uid);
    user.set_gid(gid);
    if !additional.is_empty() {
        user.set_additional_gids(Some(additional));
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ContainerConfig;

    fn root_with_db() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .unwrap();
        fs::write(
            t.path().join("etc/group"),
            "root:x:0:\nwww-data:x:34:\nstaff:x:50:www,other\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn users_resolve_from_image_files() {
        let t = root_with_db();
        let u = resolve_user(t.path(), "www").unwrap();
        assert_eq!((u.uid(), u.gid()), (33, 34));
        assert_eq!(u.additional_gids().clone(), Some(vec![50]));
        let u = resolve_user(t.path(), "1000:staff").unwrap();
        assert_eq!((u.uid(), u.gid()), (1000, 50));
        let u = resolve_user(t.path(), "").unwrap();
        assert_eq!((u.uid(), u.gid()), (0, 0));
        let err = resolve_user(t.path(), "nobody").unwrap_err().to_string();
        assert!(err.contains("/etc/passwd"), "{err}");
    }

    #[test]
    fn spec_from_image_config() {
        let t = root_with_db();
        let config = ImageConfig {
            config: Some(ContainerConfig {
                user: Some("www".into()),
                env: Some(vec!["A=1".into()]),
                entrypoint: Some(vec!["/bin/app".into()]),
                cmd: Some(vec!["--serve".into()]),
                working_dir: Some("/srv".into()),
            }),
            ..Default::default()
        };
        let spec = generate_spec(&config, t.path(), None, Path::new("img")).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["/bin/app".to_string(), "--serve".to_string()]
        );
        assert_eq!(p.cwd(), &PathBuf::from("/srv"));
        assert!(p
            .env()
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("PATH=")));
        assert_eq!(p.user().uid(), 33);
        let spec = generate_spec(
            &config,
            t.path(),
            Some(&["x".to_string()]),
            Path::new("img"),
        )
        .unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &vec!["/bin/app".to_string(), "x".to_string()]
        );
        let err =
            generate_spec(&ImageConfig::default(), t.path(), None, Path::new("img")).unwrap_err();
        assert!(err.to_string().contains("no Entrypoint or Cmd"));
    }
}
