//! Links both guests with `link.ld` at a fixed physical address, as a static non-PIE ELF.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    // The x86_64-unknown-none target links position-independent executables by default; the
    // 32-bit PVH entry needs absolute addresses, and the loaders place segments at p_paddr.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
}
