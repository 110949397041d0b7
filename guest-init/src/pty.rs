//! Pseudo-terminals for `terminal` processes: opening a pair and resizing it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kiln_protocol::TtySize;

fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a pty pair `(master, slave)`, both close-on-exec, with an optional initial size.
pub fn open(size: Option<TtySize>) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    let ws = size.map(winsize);
    let ws_ptr = ws
        .as_ref()
        .map_or(std::ptr::null(), |w| w as *const libc::winsize);
    // SAFETY: openpty writes two descriptors; name and termios are null, winsize is null or
    // points to a live struct.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            ws_ptr,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and belong to nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: sets FD_CLOEXEC on a descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

/// Sets the window size of the pty behind `master` (the kernel sends SIGWINCH).
pub fn resize(master: &OwnedFd, size: TtySize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a winsize struct from a live reference.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
