//! kiln: runc-compatible OCI runtime (see issue 5).

fn main() {
    eprintln!("kiln: not implemented yet");
    std::process::exit(1);
}
