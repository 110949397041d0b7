//! host-vmm binary: thin CLI over the `host_vmm` library.

fn main() {
    eprintln!("host-vmm: not implemented yet");
    std::process::exit(1);
}
