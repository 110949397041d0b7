//! Terminals on the host side: a pty pair whose master goes to the client over
//! `--console-socket` (SCM_RIGHTS, as runc does), and whose slave the shim relays to the guest's
//! pty stream. The shim makes the slave its controlling terminal so that a window-size change
//! on the master (the client's `TIOCSWINSZ`) reaches it as SIGWINCH.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::pty::openpty;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use thiserror::Error;

use kiln_protocol::TtySize;

/// Terminal set-up failed.
#[derive(Debug, Error)]
pub enum ConsoleError {
    /// openpty failed.
    #[error("cannot allocate a pty")]
    Openpty(#[source] nix::Error),
    /// The console socket cannot be connected.
    #[error("console socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending the master fd failed.
    #[error("sending the pty master over {path}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// ioctl on the terminal failed.
    #[error("terminal ioctl {0}")]
    Ioctl(&'static str, #[source] std::io::Error),
}

/// A pty pair.
pub struct HostPty {
    /// The master (sent to the client, then dropped here).
    pub master: OwnedFd,
    /// The slave (relayed to the guest).
    pub slave: OwnedFd,
}

/// Allocates a pty pair with `size` (if given).
pub fn open_pty(size: Option<TtySize>) -> Result<HostPty, ConsoleError> {
    let pty = openpty(None, None).map_err(ConsoleError::Openpty)?;
    let p = HostPty {
        master: pty.master,
        slave: pty.slave,
    };
    if let Some(size) = size {
        set_winsize(p.slave.as_raw_fd(), size)?;
    }
    Ok(p)
}

/// Sends `master` over the unix socket at `path` with SCM_RIGHTS (the payload is the pty's name,
/// as runc sends it).
pub fn send_console(path: &Path, master: BorrowedFd<'_>) -> Result<(), ConsoleError> {
    let stream = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let name = b"/dev/ptmx";
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|source| ConsoleError::Send {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Makes `slave` the calling process's controlling terminal (the caller must be a session leader
/// without one, which the shim is after `setsid`).
pub fn make_controlling(slave: BorrowedFd<'_>) -> Result<(), ConsoleError> {
    // SAFETY: TIOCSCTTY takes an int argument and no pointers.
    let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc < 0 {
        return Err(ConsoleError::Ioctl(
            "TIOCSCTTY",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The terminal size of `fd`.
pub fn get_winsize(fd: i32) -> Result<TtySize, ConsoleError> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which lives for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    if rc < 0 {
        return Err(ConsoleError::Ioctl(
            "TIOCGWINSZ",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Sets the terminal size of `fd`.
pub fn set_winsize(fd: i32, size: TtySize) -> Result<(), ConsoleError> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the struct we pass, which lives for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(ConsoleError::Ioctl(
            "TIOCSWINSZ",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Puts the terminal `fd` into raw mode (no echo, no line discipline) so bytes pass unchanged
/// between the host pty and the guest's pty, which does its own processing.
pub fn make_raw(fd: BorrowedFd<'_>) -> Result<(), ConsoleError> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(fd).map_err(|e| ConsoleError::Ioctl("tcgetattr", e.into()))?;
    cfmakeraw(&mut t);
    tcsetattr(fd, SetArg::TCSANOW, &t).map_err(|e| ConsoleError::Ioctl("tcsetattr", e.into()))?;
    Ok(())
}
