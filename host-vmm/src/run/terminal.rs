//! The host terminal while a terminal process runs: raw mode (restored when the guard drops, on
//! every return path and on unwinding) and its window size.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use kiln_protocol::TtySize;
use nix::sys::termios::{self, SetArg, Termios};

/// True when `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// The window size of the terminal `fd`, `None` if it is not a terminal or reports 0×0.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<TtySize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The terminal in raw mode until dropped.
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` in raw mode (input unprocessed, no echo, no signals from keys:
    /// Ctrl-C goes to the guest's pty as a byte, like `ssh -t`).
    pub fn enter(fd: BorrowedFd<'_>) -> nix::Result<RawMode> {
        let fd = fd
            .try_clone_to_owned()
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
        let saved = termios::tcgetattr(fd.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // TCSADRAIN: output written so far (the process's last lines) is shown in raw mode.
        let _ = termios::tcsetattr(self.fd.as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}
