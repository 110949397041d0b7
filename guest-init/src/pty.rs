//! Pseudo-terminals for `terminal` processes: allocating one in the container's own devpts,
//! handing its master to the agent, and resizing it.
//!
//! As runc and youki do, the pty comes from the container's devpts instance, not the guest's:
//! the child that builds the container (or the exec helper, once it joined the container's mount
//! namespace) opens `/dev/ptmx` as the container sees it, so the slave is `/dev/pts/N` inside the
//! container and `ttyname()`/`tty` work. The child keeps the slave for the process's stdio and
//! sends the master to the agent over a unix socketpair (`SCM_RIGHTS`).
//!
//! A container with no `/dev/ptmx` at all (a spec without a `/dev` tmpfs and devpts) still gets
//! a working terminal: the agent opens a guest pty master before the clone ([`open_guest_master`])
//! and the child uses it instead; `tty` then names no path, as before.
//!
//! [`open_in_child`] runs between `clone` and `execve` (see [`crate::spawn::child`]): system
//! calls on stack buffers only, no allocation, no locks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kiln_protocol::TtySize;

/// The kernel `winsize` for a protocol size.
pub fn winsize(size: TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Room for one `SCM_RIGHTS` message carrying one descriptor (`CMSG_SPACE(4)` is 24 on
/// x86_64), 8-byte aligned as `cmsghdr` requires.
type CmsgBuf = [u64; 4];

/// Agent side, before the clone: a guest pty master, the fallback for a container without
/// `/dev/ptmx`.
pub fn open_guest_master() -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")?;
    Ok(OwnedFd::from(f))
}

/// Child side: allocates a pty from the devpts behind `/dev/ptmx` of the calling process's mount
/// namespace and root (or, only if that does not exist, takes the guest master `fallback`), sets
/// its size, sends the master over `socket` and returns the slave (close-on-exec). `fallback` is
/// closed either way. On failure returns the errno; nothing stays open.
///
/// `/dev/ptmx` comes from the container's (untrusted) root: it is opened non-blocking and must
/// answer the pty-master ioctls, and the slave is obtained with `TIOCGPTPEER` from the master
/// itself, never by a path lookup.
pub fn open_in_child(
    socket: RawFd,
    fallback: RawFd,
    size: Option<libc::winsize>,
) -> Result<RawFd, i32> {
    let close = |fd: RawFd| {
        // SAFETY: closes a descriptor this function opened or was handed to own.
        unsafe { libc::close(fd) };
    };
    // SAFETY: open of a static NUL-terminated path; the descriptor is ours.
    let opened = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    let master = if opened >= 0 {
        close(fallback);
        opened
    } else {
        let e = errno();
        if e != libc::ENOENT {
            close(fallback);
            return Err(e);
        }
        fallback
    };
    let result = (|| {
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads an int from a live stack variable (fails with ENOTTY on
        // anything but a pty master).
        if unsafe { libc::ioctl(master, libc::TIOCSPTLCK, &unlock) } < 0 {
            return Err(errno());
        }
        // SAFETY: fcntl on our descriptor with integer arguments.
        let flags = unsafe { libc::fcntl(master, libc::F_GETFL) };
        // SAFETY: as above; clears O_NONBLOCK (the agent's pumps use blocking reads).
        if flags < 0 || unsafe { libc::fcntl(master, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
        {
            return Err(errno());
        }
        if let Some(ws) = size {
            // SAFETY: TIOCSWINSZ reads a winsize from a live stack variable.
            if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
                return Err(errno());
            }
        }
        // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor for the slave.
        let slave = unsafe {
            libc::ioctl(
                master,
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if slave < 0 {
            return Err(errno());
        }
        if let Err(e) = send_fd(socket, master) {
            close(slave);
            return Err(e);
        }
        Ok(slave)
    })();
    close(master);
    result
}

/// Sends `fd` with one data byte over the unix socket `socket` (no allocation).
fn send_fd(socket: RawFd, fd: RawFd) -> Result<(), i32> {
    let mut byte = [b'M'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf: CmsgBuf = [0; 4];
    // SAFETY: an all-zero msghdr is valid; the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as _;
    // SAFETY: msg_control points to `cbuf`, which is large and aligned enough for one header
    // plus one int (checked by the const assertion below), so CMSG_FIRSTHDR is non-null and
    // CMSG_DATA points inside `cbuf`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
    }
    loop {
        // SAFETY: sendmsg reads the message built above, all of it on this stack frame.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = if n < 0 { errno() } else { libc::EIO };
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

const _: () = assert!(std::mem::size_of::<CmsgBuf>() >= 24);

/// Agent side: takes the pty master the child sent on `socket`. The child sends it before it
/// reports on its status pipe, so this never waits (`MSG_DONTWAIT`): nothing queued is an error.
/// The descriptor is checked to be a pty master.
pub fn recv_master(socket: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf: CmsgBuf = [0; 4];
    // SAFETY: an all-zero msghdr is valid; the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
    // SAFETY: recvmsg writes at most iov_len data bytes and msg_controllen control bytes into
    // the buffers above.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Take ownership of every descriptor received first, so none leaks on an error below.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer the kernel filled, bounded by
    // msg_controllen; each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors
    // that the kernel installed in this process for us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..len / 4 {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n != 1 || fds.len() != 1 || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(format!(
            "expected one pty master from the child, got {n} data bytes and {} descriptors",
            fds.len()
        )));
    }
    let master = fds.remove(0);
    let mut ptn: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int into a live stack variable.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut ptn) } < 0 {
        return Err(io::Error::other(
            "the descriptor the child sent is not a pty master",
        ));
    }
    Ok(master)
}

/// Creates a close-on-exec unix stream socketpair: `(agent end, child end)`.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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
