//! Signals of `host-vmm -- CMD`: SIGINT, SIGTERM and SIGHUP become [`Control::Signal`] (forwarded
//! to the guest process, a second one stops the VM), SIGWINCH becomes
//! [`Control::WindowChanged`].
//!
//! They are blocked in the main thread before any other thread exists, so every thread inherits
//! the mask and only the dedicated `sigwait` thread ever takes them.

use std::sync::mpsc::Sender;

use nix::sys::signal::{SigSet, Signal};

use super::session::Control;

fn set() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    set
}

/// Blocks the handled signals in the calling thread (and the threads it starts afterwards).
pub fn block() -> nix::Result<()> {
    set().thread_block()
}

/// Starts the thread that turns pending signals into controls; it ends when `tx`'s receiver is
/// gone.
pub fn spawn_forwarder(tx: Sender<Control>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = set();
            loop {
                let control = match set.wait() {
                    Ok(Signal::SIGWINCH) => Control::WindowChanged,
                    Ok(sig) => Control::Signal(sig as i32),
                    Err(_) => continue,
                };
                if tx.send(control).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}
