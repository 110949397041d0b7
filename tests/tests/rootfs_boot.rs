//! Images built by rootfs-builder from real container images boot and run a command through the
//! real guest-init (static musl, PID 1 at `/kiln/guest-init`, container under `/rootfs`), on the
//! backend `Backend::detect()` picks: QEMU TCG with `vhost-device-vsock` on this PVM machine,
//! host-vmm where KVM runs Linux userspace. Each test prints the backend and why.
//!
//! - busybox-static imported with `podman import` and saved as oci-archive, docker-archive and
//!   oci-dir: `/bin/sh -c 'echo ok; ls /'`;
//! - a hand-written three-layer OCI layout with whiteouts: inside the guest, whited-out files
//!   and directories are absent and the opaque directory holds only the upper layer's files;
//! - a Debian bookworm minbase from `debootstrap` (cached in `target/rootfs-tests`): `apt
//!   --version`.
//!
//! Every image is built as ext4 and as EROFS and booted once; each boot prints build time, size
//! and agent-ready / command-exit / VM-exit times (docs/rootfs.md, "Boot with the real
//! guest-init"). Run with `cargo test --release -p kiln-tests --test rootfs_boot -- --nocapture`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use kiln_protocol::ExitStatus;
use kiln_tests::e2e::process;
use kiln_tests::guests::TempDir;
use kiln_tests::rootfs_boot::{
    boot_and_run, boot_spec, build_agent_image, debian_minbase, detect_backend, podman_images,
    process_with_env, run, BootRun, BUSYBOX, DEBIAN_PATH,
};
use rootfs_builder::Format;
use sha2::{Digest, Sha256};

const FORMATS: [Format; 2] = [Format::Ext4, Format::Erofs];

/// Builds `input` in `format`, checks it with `e2fsck -fn` or `fsck.erofs`, boots it once with `args` as the container's main process and
/// returns what ran. Container mounts (`/proc`, `/dev`, `/tmp`, `/sys`) are used unless the
/// image is EROFS and lacks their mount points (`mount_points_in_image`).
fn boot_image(
    input: &Path,
    what: &str,
    format: Format,
    spec_process: kiln_protocol::ProcessSpec,
    mount_points_in_image: bool,
) -> BootRun {
    let detection = detect_backend();
    eprintln!(
        "rootfs-boot: backend {} ({})",
        detection.backend, detection.reason
    );
    let dir = TempDir::new("rootfs-boot-img");
    let image = build_agent_image(input, dir.path(), "image", format)
        .unwrap_or_else(|e| panic!("{what} {format:?}: {e:#}"));
    match format {
        Format::Ext4 => run(Command::new("e2fsck").arg("-fn").arg(&image.path)),
        Format::Erofs => run(Command::new("fsck.erofs").arg(&image.path)),
    };
    let mounts = format == Format::Ext4 || mount_points_in_image;
    let booted = boot_and_run(&image, boot_spec(spec_process, mounts), &detection.backend)
        .unwrap_or_else(|e| panic!("{what} {format:?}: {e:#}"));
    eprintln!(
        "{} (image {} bytes, built in {:.2?})",
        booted.summary(&format!("{what} {format:?}")),
        image.size,
        image.build_time
    );
    booted
}

/// `/bin/sh -c 'echo ok; ls /'` in the podman busybox image: `ok`, then the container's root.
fn busybox_echo_ls(input: &Path, what: &str) {
    for format in FORMATS {
        let booted = boot_image(
            input,
            what,
            format,
            process(&["/bin/sh", "-c", "echo ok; ls /"]),
            false,
        );
        // The image has /bin and /etc; with ext4 guest-init created the mount points of
        // /proc, /dev, /tmp and /sys; the EROFS container has no mounts.
        let want = match format {
            Format::Ext4 => "ok\nbin\ndev\netc\nproc\nsys\ntmp\n",
            Format::Erofs => "ok\nbin\netc\n",
        };
        assert_eq!(
            (
                booted.status,
                booted.stdout.as_str(),
                booted.stderr.as_str()
            ),
            (ExitStatus::Exited(0), want, ""),
            "{what} {format:?}"
        );
    }
}

#[test]
fn rootfs_boot_podman_oci_archive() {
    busybox_echo_ls(&podman_images().oci_archive, "busybox oci-archive");
}

#[test]
fn rootfs_boot_podman_docker_archive() {
    busybox_echo_ls(&podman_images().docker_archive, "busybox docker-archive");
}

#[test]
fn rootfs_boot_podman_oci_dir() {
    busybox_echo_ls(&podman_images().oci_dir, "busybox oci-dir");
}

/// One tar entry: a directory, or a regular file with its bytes (whiteouts are empty files).
enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

fn tar_layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut h = tar::Header::new_ustar();
        let (path, data, kind, mode) = match entry {
            Entry::Dir(p) => (*p, &b""[..], tar::EntryType::Directory, 0o755),
            Entry::File(p, d) => (*p, *d, tar::EntryType::Regular, 0o755),
        };
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an OCI image layout at `dir` with three layers:
/// 1. (tar) busybox, `/etc/{keep,secret}`, `/app/{config=v1,old/data}`, `/gone/file`;
/// 2. (gzip) whiteouts of `/etc/secret` and of the whole `/gone`, `/app` made opaque with
///    `/app/config=v2` and `/app/new`;
/// 3. (gzip) `/etc/added` and a whiteout of layer 2's `/app/new`.
fn whiteout_layout(dir: &Path) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let blob = |media_type: &str, data: &[u8]| {
        let hex = sha256_hex(data);
        fs::write(blobs.join(&hex), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"),
            "size": data.len()})
    };
    let busybox = fs::read(BUSYBOX).unwrap();
    let layers = [
        tar_layer(&[
            Entry::Dir("bin"),
            Entry::File("bin/busybox", &busybox),
            Entry::Dir("etc"),
            Entry::File("etc/keep", b"keep"),
            Entry::File("etc/secret", b"secret"),
            Entry::Dir("app"),
            Entry::File("app/config", b"v1"),
            Entry::Dir("app/old"),
            Entry::File("app/old/data", b"old"),
            Entry::Dir("gone"),
            Entry::File("gone/file", b"gone"),
        ]),
        tar_layer(&[
            Entry::File(".wh.gone", b""),
            Entry::Dir("etc"),
            Entry::File("etc/.wh.secret", b""),
            Entry::Dir("app"),
            Entry::File("app/config", b"v2"),
            Entry::File("app/.wh..wh..opq", b""),
            Entry::File("app/new", b"new"),
        ]),
        tar_layer(&[
            Entry::Dir("etc"),
            Entry::File("etc/added", b"3"),
            Entry::File("app/.wh.new", b""),
        ]),
    ];
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| match i {
            0 => blob("application/vnd.oci.image.layer.v1.tar", l),
            _ => blob("application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l)),
        })
        .collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let config = blob(
        "application/vnd.oci.image.config.v1+json",
        config.to_string().as_bytes(),
    );
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descriptors});
    let mut manifest = blob(
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    );
    manifest["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").unwrap();
}

/// Lists what the container sees, with busybox only (the image has no applet links).
const WHITEOUT_CHECK: &str = "B=/bin/busybox
echo root: $($B ls -A /)
echo etc: $($B ls -A /etc)
echo app: $($B ls -A /app)
echo config: $($B cat /app/config)
for p in /etc/secret /app/old /app/old/data /app/new /gone /gone/file; do
  if [ -e $p ]; then echo present: $p; fi
done";

#[test]
fn rootfs_boot_multilayer_whiteouts() {
    let dir = TempDir::new("rootfs-boot-layout");
    let layout = dir.path().join("layout");
    whiteout_layout(&layout);
    for format in FORMATS {
        let booted = boot_image(
            &layout,
            "whiteout layout",
            format,
            process(&["/bin/busybox", "sh", "-c", WHITEOUT_CHECK]),
            false,
        );
        let root = match format {
            Format::Ext4 => "app bin dev etc proc sys tmp",
            Format::Erofs => "app bin etc",
        };
        let want = format!("root: {root}\netc: added keep\napp: config\nconfig: v2\n");
        assert_eq!(
            (
                booted.status,
                booted.stdout.as_str(),
                booted.stderr.as_str()
            ),
            (ExitStatus::Exited(0), want.as_str(), ""),
            "whiteouts {format:?}: whited-out entries must be absent, /app only layer 2's config"
        );
    }
}

/// Debian bookworm minbase: `apt --version` (found through `PATH`, dynamically linked against
/// the image's libraries). The tree has its own `/proc`, `/dev`, `/sys`, `/tmp`, so the EROFS
/// boot gets the container mounts too.
#[test]
fn rootfs_boot_debian_minbase() {
    let rootfs = debian_minbase().unwrap_or_else(|e| panic!("Debian minbase: {e:#}"));
    for format in FORMATS {
        let booted = boot_image(
            &rootfs,
            "debian minbase",
            format,
            process_with_env(&["apt", "--version"], DEBIAN_PATH),
            true,
        );
        assert_eq!(
            booted.status,
            ExitStatus::Exited(0),
            "debian {format:?}: apt --version failed\nstdout: {}\nstderr: {}",
            booted.stdout,
            booted.stderr
        );
        assert!(
            booted.stdout.starts_with("apt 2.") && booted.stdout.trim_end().ends_with("(amd64)"),
            "debian {format:?}: unexpected apt --version output {:?} (stderr {:?})",
            booted.stdout,
            booted.stderr
        );
    }
}
