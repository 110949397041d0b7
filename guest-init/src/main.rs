//! guest-init: PID 1 of a kiln microVM (see issue 3).

fn main() {
    eprintln!("guest-init: not implemented yet");
    std::process::exit(1);
}
