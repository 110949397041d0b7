//! rootfs-builder against images made by real tools, with no registry: `podman import` of a
//! busybox-static rootfs saved as oci-archive, docker-archive and oci-dir; a multi-layer OCI
//! layout with whiteouts written by hand; a bundle run by `runc` as the oracle for config.json.
//!
//! Images are inspected with `debugfs`, `e2fsck -fn`, `fsck.erofs` and `dump.erofs`; booting them
//! with the real guest-init (and the Debian minbase from `debootstrap`) is `rootfs_boot.rs`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

// The podman busybox image is shared with `rootfs_boot.rs`, which boots it with the real agent.
use kiln_tests::rootfs_boot::{podman_images, run, scratch, APPLETS, BUSYBOX};
use rootfs_builder::{build_bundle, build_image, BuildOptions, BundleOptions, Format, Layout};
use sha2::{Digest, Sha256};

fn debugfs(image: &Path, request: &str) -> String {
    run(Command::new("debugfs").arg("-R").arg(request).arg(image))
}

fn check_ext4(image: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(image));
}

/// Checks an agent-layout busybox image: agent, mount points, untouched container files.
fn check_busybox_agent_image(image: &Path) {
    check_ext4(image);
    let root = debugfs(image, "ls -l /");
    for d in ["kiln", "rootfs", "proc", "sys", "dev", "run", "tmp"] {
        assert!(
            root.contains(&format!(" {d}\n")) || root.contains(&format!(" {d} ")),
            "/{d} missing:\n{root}"
        );
    }
    let kiln = debugfs(image, "ls -l /kiln");
    assert!(
        kiln.contains("100755") && kiln.contains("guest-init"),
        "{kiln}"
    );
    let bin = debugfs(image, "ls -l /rootfs/bin");
    let size = fs::metadata(BUSYBOX).unwrap().len().to_string();
    assert!(
        bin.contains("100755") && bin.contains(&size) && bin.contains("busybox"),
        "{bin}"
    );
    for a in APPLETS {
        assert!(bin.contains(&format!(" {a}")), "applet {a} missing:\n{bin}");
    }
    assert!(bin.contains("120777"), "symlinks missing:\n{bin}");
    let passwd = debugfs(image, "cat /rootfs/etc/passwd");
    assert!(passwd.starts_with("root:x:0:0"), "{passwd}");
}

fn agent_opts(from: &Path, out: &Path) -> BuildOptions {
    let mut o = BuildOptions::new(from, Some(out.to_path_buf()));
    o.layout = Layout::Agent {
        guest_init: PathBuf::from(BUSYBOX),
    };
    o.cache = None;
    o
}

#[test]
fn rootfs_podman_oci_archive_to_ext4() {
    let images = podman_images();
    let dir = scratch("oci-archive-out");
    let out = dir.join("img.ext4");
    let started = Instant::now();
    let built = build_image(&agent_opts(&images.oci_archive, &out)).unwrap();
    eprintln!(
        "oci-archive -> ext4: {:?}, {} bytes",
        started.elapsed(),
        built.size
    );
    check_busybox_agent_image(&out);
    let c = built.config.unwrap().config.unwrap();
    assert_eq!(c.working_dir.as_deref(), Some("/etc"));
}

#[test]
fn rootfs_podman_docker_archive_to_ext4() {
    let images = podman_images();
    let dir = scratch("docker-archive-out");
    let out = dir.join("img.ext4");
    build_image(&agent_opts(&images.docker_archive, &out)).unwrap();
    check_busybox_agent_image(&out);
}

#[test]
fn rootfs_podman_oci_dir_to_ext4_and_erofs() {
    let images = podman_images();
    let dir = scratch("oci-dir-out");
    let ext4 = dir.join("img.ext4");
    let t = Instant::now();
    let built = build_image(&agent_opts(&images.oci_dir, &ext4)).unwrap();
    let ext4_time = t.elapsed();
    check_busybox_agent_image(&ext4);

    let erofs = dir.join("img.erofs");
    let mut o = agent_opts(&images.oci_dir, &erofs);
    o.format = Format::Erofs;
    let t = Instant::now();
    let built_erofs = build_image(&o).unwrap();
    let erofs_time = t.elapsed();
    run(Command::new("fsck.erofs").arg(&erofs));
    let ls = run(Command::new("dump.erofs")
        .args(["--ls", "--path=/rootfs/bin"])
        .arg(&erofs));
    assert!(ls.contains("busybox") && ls.contains("sh"), "{ls}");
    let gi = run(Command::new("dump.erofs")
        .args(["--path=/kiln/guest-init"])
        .arg(&erofs));
    assert!(gi.contains("0755"), "{gi}");
    eprintln!(
        "busybox oci-dir: ext4 {} bytes in {ext4_time:?}, erofs {} bytes in {erofs_time:?}",
        built.size, built_erofs.size
    );
}

#[test]
fn rootfs_plain_layout_and_cache() {
    let images = podman_images();
    let dir = scratch("plain-cache");
    let cache = dir.join("cache");
    let mut o = BuildOptions::new(&images.oci_archive, Some(dir.join("a.ext4")));
    o.cache = Some(cache.clone());
    let first = build_image(&o).unwrap();
    assert!(!first.cache_hit);
    let bin = debugfs(&first.path, "ls -l /bin");
    assert!(
        bin.contains("busybox"),
        "plain layout puts the container at the root:\n{bin}"
    );
    o.out = Some(dir.join("b.ext4"));
    let t = Instant::now();
    let second = build_image(&o).unwrap();
    let cached = t.elapsed();
    assert!(second.cache_hit);
    check_ext4(&second.path);
    eprintln!("cached rebuild (oci-archive, copy to output): {cached:?}");
    o.out = None;
    let t = Instant::now();
    let third = build_image(&o).unwrap();
    eprintln!(
        "cached rebuild (oci-archive, cache path returned): {:?}",
        t.elapsed()
    );
    assert!(third.cache_hit && third.path.starts_with(&cache));
}

#[test]
fn rootfs_bundle_runs_under_runc() {
    let images = podman_images();
    let dir = scratch("bundle");
    let bundle = dir.join("bundle");
    let built = build_bundle(&BundleOptions {
        image: images.oci_archive.clone(),
        input_kind: Default::default(),
        out_dir: bundle.clone(),
        format: Format::Ext4,
        size: None,
        layout: Layout::Agent {
            guest_init: PathBuf::from(BUSYBOX),
        },
        erofs_compression: None,
        args: None,
        progress: None,
    })
    .unwrap();
    let process = built.spec.process().clone().unwrap();
    assert_eq!(
        process.args().clone().unwrap(),
        vec!["/bin/sh", "-c", "echo hi"]
    );
    assert_eq!(process.cwd(), Path::new("/etc"));
    assert_eq!((process.user().uid(), process.user().gid()), (65534, 65534));
    let names: Vec<_> = fs::read_dir(&bundle)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["config.json", "rootfs", "rootfs.ext4"]);
    check_busybox_agent_image(&built.image);
    assert!(bundle.join("rootfs/bin/busybox").is_file());

    // runc is the oracle for config.json: it must run the image's command as is.
    let out = run(Command::new("runc")
        .arg("--root")
        .arg(dir.join("runc"))
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(format!("kiln-rootfs-test-{}", std::process::id()))
        .stdin(std::process::Stdio::null()));
    assert_eq!(out.trim(), "hi");
}

/// Writes an OCI layout by hand: three layers (plain tar, gzip, gzip) with whiteouts.
fn whiteout_layout(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let blob = |data: &[u8]| {
        let hex: String = Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
        serde_json::json!({"digest": format!("sha256:{hex}"), "size": data.len()})
    };
    let layer = |entries: &[(&str, Option<&[u8]>)]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_ustar();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                }
            }
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, data.unwrap_or(b"")).unwrap();
        }
        b.into_inner().unwrap()
    };
    let gz = |data: Vec<u8>| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        e.finish().unwrap()
    };
    let mut busybox_entries: Vec<(String, Vec<u8>)> =
        vec![("bin/busybox".into(), fs::read(BUSYBOX).unwrap())];
    busybox_entries.push(("etc/keep".into(), b"keep".to_vec()));
    let busy: Vec<(&str, Option<&[u8]>)> = [
        ("bin", None),
        ("etc", None),
        ("app", None),
        ("app/old", None),
    ]
    .into_iter()
    .chain(
        busybox_entries
            .iter()
            .map(|(p, d)| (p.as_str(), Some(d.as_slice()))),
    )
    .chain([
        ("etc/secret", Some(&b"gone"[..])),
        ("app/old/data", Some(&b"old"[..])),
        ("app/config", Some(&b"v1"[..])),
    ])
    .collect();
    let l1 = layer(&busy);
    let l2 = gz(layer(&[
        ("etc/.wh.secret", Some(b"")),
        ("app", None),
        ("app/.wh..wh..opq", Some(b"")),
        ("app/config", Some(b"v2")),
    ]));
    let l3 = gz(layer(&[("etc/added", Some(b"3"))]));
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["echo", "layers"]}});
    let mut cfg = blob(config.to_string().as_bytes());
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let mut layers = Vec::new();
    for (data, mt) in [(l1, "tar"), (l2, "tar+gzip"), (l3, "tar+gzip")] {
        let mut d = blob(&data);
        d["mediaType"] = format!("application/vnd.oci.image.layer.v1.{mt}").into();
        layers.push(d);
    }
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg, "layers": layers});
    let mut m = blob(manifest.to_string().as_bytes());
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    // A nested index with an arm64 manifest first, as multi-arch images have.
    let arm = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "0".repeat(64)), "size": 1, "platform": {"architecture": "arm64", "os": "linux"}});
    m["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [arm, m]});
    let mut n = blob(nested.to_string().as_bytes());
    n["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [n]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").unwrap();
}

#[test]
fn rootfs_multilayer_whiteouts() {
    let dir = scratch("whiteouts");
    let layout = dir.join("layout");
    whiteout_layout(&layout);
    let out = dir.join("img.ext4");
    build_image(&agent_opts(&layout, &out)).unwrap();
    check_ext4(&out);
    let etc = debugfs(&out, "ls /rootfs/etc");
    assert!(
        etc.contains("keep") && etc.contains("added") && !etc.contains("secret"),
        "{etc}"
    );
    let app = debugfs(&out, "ls /rootfs/app");
    assert!(
        app.contains("config") && !app.contains("old"),
        "opaque dir kept lower entries:\n{app}"
    );
    assert_eq!(debugfs(&out, "cat /rootfs/app/config"), "v2");
}

/// Boots `image` with kiln's kernel under QEMU TCG and `init=/kiln/guest-init`; returns the
/// console and the boot-to-exit time.
fn boot_under_tcg(image: &Path, root_opts: &str, init_args: &str) -> (String, std::time::Duration) {
    let vmlinux = kiln_tests::kernel::vmlinux();
    let started = Instant::now();
    let out = Command::new("timeout")
        .args([
            "180",
            "qemu-system-x86_64",
            "-M",
            "microvm,acpi=off",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args([
            "-smp",
            "1",
            "-m",
            "512",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&vmlinux)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet root=/dev/vda {root_opts} init={} {init_args}",
            rootfs_builder::GUEST_INIT_PATH
        ))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            image.display()
        ))
        .args([
            "-device",
            "virtio-blk-device,drive=root",
            "-no-reboot",
            "-device",
            "i8042",
        ])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "{}: QEMU {}\n{console}",
        image.display(),
        out.status
    );
    (console, elapsed)
}

/// Unmounts on drop, so a failed assertion does not leave a loop mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The host kernel mounts both formats and runs the container's shell from them (read-only loop
/// mounts; needs root and loop devices).
#[test]
fn rootfs_images_mount_and_run() {
    if !nix_is_root() {
        eprintln!("!!! rootfs_images_mount_and_run needs root for loop mounts: SKIPPED");
        return;
    }
    let images = podman_images();
    let dir = scratch("mount");
    for format in [Format::Ext4, Format::Erofs] {
        let out = dir.join(format!("img.{}", format.extension()));
        let mut o = agent_opts(&images.docker_archive, &out);
        o.format = format;
        build_image(&o).unwrap();
        let mnt = dir.join(format!("mnt-{}", format.extension()));
        fs::create_dir_all(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&out)
            .arg(&mnt));
        let _mount = Mount(mnt.clone());
        let gi = fs::metadata(mnt.join("kiln/guest-init")).unwrap();
        assert!(std::os::unix::fs::PermissionsExt::mode(&gi.permissions()) & 0o111 != 0);
        let said = run(Command::new("chroot").arg(mnt.join("rootfs")).args([
            "/bin/sh",
            "-c",
            "echo ok from $0",
        ]));
        assert_eq!(said.trim(), "ok from /bin/sh", "{format:?}");
    }
}

fn nix_is_root() -> bool {
    // The tests crate has no libc dependency: ask id(1).
    run(Command::new("id").arg("-u")).trim() == "0"
}

/// A stand-in for guest-init (the real agent is tested by the guest-init tests): a busybox shell
/// script at `/kiln/guest-init` that runs a command in `/rootfs` the way the agent will.
const STAND_IN_AGENT: &str = r#"#!/rootfs/bin/busybox sh
B=/rootfs/bin/busybox
$B mount -t proc proc /proc
echo "KILN-AGENT-ROOT $($B grep ' / ' /proc/mounts)"
$B chroot /rootfs /bin/sh -c 'echo KILN-CONTAINER-$((6*7))'
$B reboot -f
"#;

/// Agent-layout images built from the podman image boot kiln's guest kernel under QEMU TCG, with
/// `init=/kiln/guest-init`, as ext4 (read-write) and EROFS (read-only); prints boot-to-exit times.
#[test]
fn rootfs_images_boot_under_qemu_tcg() {
    let images = podman_images();
    let dir = scratch("boot");
    let agent = dir.join("guest-init");
    fs::write(&agent, STAND_IN_AGENT).unwrap();
    for (format, root_opts, fstype) in [
        (Format::Ext4, "rw", "ext4 rw"),
        (Format::Erofs, "ro rootfstype=erofs", "erofs ro"),
    ] {
        let image = dir.join(format!("busybox.{}", format.extension()));
        let mut o = agent_opts(&images.oci_archive, &image);
        o.layout = Layout::Agent {
            guest_init: agent.clone(),
        };
        o.format = format;
        build_image(&o).unwrap();
        let (console, elapsed) = boot_under_tcg(&image, root_opts, "");
        assert!(
            console.contains("KILN-CONTAINER-42"),
            "{format:?}: container command did not run\n{console}"
        );
        assert!(
            console.contains(&format!("KILN-AGENT-ROOT /dev/root / {fstype}")),
            "{format:?}: root not mounted as {fstype}\n{console}"
        );
        eprintln!("boot-to-exit under QEMU TCG, {format:?}: {elapsed:?}");
    }
}
