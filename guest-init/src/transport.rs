//! Listeners: vsock (the VM's transport) and a unix socket (tests, debugging). Every accepted
//! connection is served on its own thread by [`crate::server::serve`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::agent::Agent;

const CONNECTION_STACK: usize = 256 * 1024;

/// Connections being served at once (control connections for their lifetime, stdio connections
/// until attached); more are closed at accept.
const MAX_CONNECTIONS: usize = 1024;

static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Counts one open connection for as long as it lives.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

fn spawn_connection(agent: &Arc<Agent>, fd: OwnedFd) {
    if OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        log::warn!("refusing a connection: {MAX_CONNECTIONS} already open");
        return;
    }
    let slot = Slot;
    let agent = agent.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            let _slot = slot;
            crate::server::serve(agent, File::from(fd))
        });
    if let Err(e) = spawned {
        log::warn!("no thread for a new connection: {e}");
    }
}

/// Listens on the unix socket `path` (replacing a stale socket file) on a new thread.
pub fn listen_unix(agent: &Arc<Agent>, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding unix socket {}", path.display()))?;
    let agent = agent.clone();
    std::thread::Builder::new()
        .name("listen-unix".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            match listener.accept() {
                Ok((stream, _)) => spawn_connection(&agent, OwnedFd::from(stream)),
                Err(e) => {
                    log::warn!("unix accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        })
        .context("starting the unix listener thread")?;
    Ok(())
}

/// Listens on vsock `port` (any CID) on a new thread.
pub fn listen_vsock(agent: &Arc<Agent>, port: u32) -> Result<()> {
    let listener = vsock::VsockListener::bind_with_cid_port(libc::VMADDR_CID_ANY, port)
        .with_context(|| format!("binding vsock port {port}"))?;
    let agent = agent.clone();
    std::thread::Builder::new()
        .name("listen-vsock".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            match listener.accept() {
                Ok((stream, _)) => spawn_connection(&agent, OwnedFd::from(stream)),
                Err(e) => {
                    log::warn!("vsock accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        })
        .context("starting the vsock listener thread")?;
    Ok(())
}
