//! The command-line contract: one-line errors naming the file, non-zero exit, no partial output.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn builder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rootfs-builder"))
        .args(args)
        .output()
        .expect("run rootfs-builder")
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("rootfs-builder: ") && last.contains(needle),
        "expected a last line naming {needle:?}:\n{stderr}"
    );
    assert!(stderr.ends_with('\n') && !last.is_empty());
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn missing_input_is_one_line() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("img.ext4");
    let missing = t.path().join("no-such-image.tar");
    let res = builder(&[
        "build",
        "--from",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-cache",
    ]);
    assert_one_line_error(&res, "no-such-image.tar");
    assert!(entries(t.path()).is_empty());
}

#[test]
fn corrupt_gzip_tarball_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "file", &data[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let mut bytes = gz.finish().unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xa5;
    let input = t.path().join("broken.tar.gz");
    fs::write(&input, bytes).unwrap();
    let out_dir = t.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let cache = t.path().join("cache");
    let res = builder(&[
        "build",
        "--from",
        input.to_str().unwrap(),
        "--out",
        out_dir.join("img.ext4").to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert_one_line_error(&res, "broken.tar.gz");
    assert!(entries(&out_dir).is_empty());
    assert!(entries(&cache.join("images")).is_empty());
    assert!(entries(&cache.join("tmp")).is_empty());
}

#[test]
fn build_then_cached_build() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), "kiln\n").unwrap();
    let cache = t.path().join("cache");
    let args = |out: &str| {
        vec![
            "build".to_string(),
            "--from".into(),
            root.to_str().unwrap().into(),
            "--out".into(),
            t.path().join(out).to_str().unwrap().into(),
            "--cache".into(),
            cache.to_str().unwrap().into(),
        ]
    };
    let first = builder(
        &args("a.ext4")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = builder(
        &args("b.ext4")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("cached"));
    // Layout and guest-init options are checked before any work.
    let bad = builder(&["build", "--from", "x", "--out", "y", "--layout", "agent"]);
    assert_one_line_error(&bad, "--guest-init");
}
