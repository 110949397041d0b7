//! Allow list of the VMM thread (the main thread running `event_loop::EventLoop`), installed
//! once every vCPU thread is started and before the loop serves its first event.
//!
//! What runs on the thread afterwards: `epoll_wait` on every device eventfd; virtio-blk
//! requests (seek + read/write, fdatasync); the vsock muxer (unix-socket accept/connect,
//! stream I/O, its internal epoll set and request timer); stdin forwarded to the serial port;
//! at the end, kicking the vCPU threads (SIGRTMIN), joining them, and tearing the VM down.

use super::rule::{self, Allowed, ArgCheck};
use super::{common, FilterContext};

/// The VMM thread's allow list.
pub fn allowed(ctx: &FilterContext) -> Vec<Allowed> {
    use libc::*;
    let mut list = common();
    list.extend([
        Allowed::any(
            SYS_epoll_wait,
            "the event loop; the vsock muxer's own epoll set",
        ),
        Allowed::any(
            SYS_epoll_ctl,
            "vsock streams come and go; stdin dropped at EOF",
        ),
        Allowed::any(SYS_read, "eventfds, stdin, disk image, vsock streams"),
        Allowed::any(
            SYS_lseek,
            "virtio-blk positions the image before each read/write",
        ),
        Allowed::any(SYS_fdatasync, "virtio-blk FLUSH"),
        // vsock host side (devices/virtio/vsock/muxer.rs).
        rule::arg_in(
            SYS_accept4,
            "vsock: host clients connecting to the device's socket (std: SOCK_CLOEXEC)",
            3,
            &[SOCK_CLOEXEC as u64],
        ),
        Allowed::when(
            SYS_socket,
            "vsock: guest connections to host port P open a unix stream to UDS_P",
            vec![vec![
                ArgCheck::Eq32 {
                    arg: 0,
                    value: AF_UNIX as u32,
                },
                ArgCheck::Eq32 {
                    arg: 1,
                    value: (SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC) as u32,
                },
            ]],
        ),
        Allowed::any(SYS_connect, "vsock: connect that unix stream"),
        rule::arg_in(
            SYS_shutdown,
            "vsock: the guest shut its sending side, so we shut our write side",
            1,
            &[SHUT_WR as u64],
        ),
        Allowed::any(SYS_recvfrom, "vsock: std reads unix streams with recv"),
        Allowed::any(SYS_sendto, "vsock: std writes unix streams with send"),
        rule::ioctl_requests(
            "vsock: std's set_nonblocking on accepted streams",
            &[FIONBIO],
        ),
        Allowed::any(
            SYS_timerfd_settime,
            "vsock: arm/disarm the CONNECT request timer",
        ),
        Allowed::any(
            SYS_unlink,
            "vsock: the muxer removes its socket file at exit",
        ),
        // Stopping the VM (vmm.rs stop_vcpus).
        Allowed::any(
            SYS_getpid,
            "glibc pthread_kill checks the target is in this process",
        ),
        Allowed::when(
            SYS_tgkill,
            "kick the vCPU threads out of KVM_RUN, only in this process, only SIGRTMIN",
            vec![vec![
                ArgCheck::Eq32 {
                    arg: 0,
                    value: ctx.pid,
                },
                ArgCheck::Eq32 {
                    arg: 2,
                    value: ctx.kick_signal as u32,
                },
            ]],
        ),
    ]);
    list
}
