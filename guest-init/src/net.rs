//! Bringing the loopback interface up: at boot (the guest's own network namespace) and in a
//! container's new network namespace. Container programs commonly talk to 127.0.0.1.
//!
//! Async-signal-safe (stack memory and system calls only), so a cloned child may call it.

/// Sets `IFF_UP` on `lo` in the calling thread's network namespace; returns the errno on failure.
pub fn loopback_up() -> Result<(), i32> {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: creates a datagram socket used only for interface ioctls; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq on our stack.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            Err(errno())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
                Err(errno())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result
}
