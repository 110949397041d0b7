//! Listeners: vsock (the VM's transport) and a unix socket (tests, debugging). Every accepted
//! connection is served on its own thread by [`crate::server::serve`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::agent::Agent;

const CONNECTION_STACK: usize = 256 * 1024;

fn spawn_connection(agent: &Arc<Agent>, fd: OwnedFd) {
    let agent = agent.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || crate::server::serve(agent, File::from(fd)));
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
