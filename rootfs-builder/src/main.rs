//! rootfs-builder binary.

fn main() {
    eprintln!("rootfs-builder: not implemented yet");
    std::process::exit(1);
}
