//! The container spec `host-vmm -- CMD` runs: the image's `/rootfs` as root, CMD as the process,
//! root user in `/`, a conventional `PATH`, the usual kernel filesystems.
//!
//! No pid namespace: a command that is PID 1 of its own namespace ignores SIGINT/SIGTERM it
//! installed no handler for, so a forwarded Ctrl-C would do nothing (the VM already isolates the
//! command; guest-init reaps its orphans).

use kiln_protocol::{
    ContainerSpec, MountSpec, Namespace, NamespaceKind, ProcessSpec, RootSpec, TtySize,
};

/// Where the container's files are in the image (rootfs-builder's agent layout).
pub const CONTAINER_ROOT: &str = "/rootfs";

/// `PATH` of the command.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Hostname inside the container.
pub const HOSTNAME: &str = "kiln";

fn mount(destination: &str, fstype: &str, options: &[&str]) -> MountSpec {
    MountSpec {
        destination: destination.into(),
        fstype: Some(fstype.into()),
        source: Some(fstype.into()),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// The spec for running `args`. `terminal`: `Some((TERM, size))` when the host's stdin is a
/// terminal (the process gets a pty of that size and `TERM`), `None` for plain pipes.
pub fn command_spec(args: &[String], terminal: Option<(&str, Option<TtySize>)>) -> ContainerSpec {
    let mut env = vec![DEFAULT_PATH.to_string()];
    if let Some((term, _)) = terminal {
        env.push(format!("TERM={term}"));
    }
    let mut spec = ContainerSpec {
        process: ProcessSpec {
            args: args.to_vec(),
            env,
            cwd: "/".into(),
            terminal: terminal.is_some(),
            console_size: terminal.and_then(|(_, size)| size),
            ..Default::default()
        },
        root: RootSpec {
            path: CONTAINER_ROOT.into(),
            ..Default::default()
        },
        hostname: Some(HOSTNAME.into()),
        mounts: vec![
            mount("/proc", "proc", &["nosuid", "nodev", "noexec"]),
            mount("/dev", "tmpfs", &["nosuid", "mode=755"]),
            // The guest's own devpts, where the agent allocates the command's pty: so the
            // terminal has a name (`tty`, ttyname) inside the container. A new devpts instance
            // would hide it; the VM holds only this container.
            MountSpec {
                destination: "/dev/pts".into(),
                fstype: Some("bind".into()),
                source: Some("/dev/pts".into()),
                options: vec!["bind".into(), "nosuid".into(), "noexec".into()],
            },
            mount("/dev/shm", "tmpfs", &["nosuid", "nodev", "mode=1777"]),
            mount("/tmp", "tmpfs", &["nosuid", "nodev"]),
            mount("/sys", "sysfs", &["ro", "nosuid", "nodev", "noexec"]),
        ],
        ..Default::default()
    };
    spec.linux.namespaces = [NamespaceKind::Mount, NamespaceKind::Ipc, NamespaceKind::Uts]
        .into_iter()
        .map(|kind| Namespace { kind, path: None })
        .collect();
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_and_terminal() {
        let args = vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()];
        let s = command_spec(&args, None);
        assert_eq!(s.process.args, args);
        assert_eq!(s.process.env, vec![DEFAULT_PATH.to_string()]);
        assert_eq!((s.process.cwd.as_str(), s.process.user.uid), ("/", 0));
        assert!(!s.process.terminal && s.process.console_size.is_none());
        assert_eq!(s.root.path, "/rootfs");
        assert!(s
            .linux
            .namespaces
            .iter()
            .all(|n| n.kind != NamespaceKind::Pid));
        let size = TtySize { rows: 24, cols: 80 };
        let t = command_spec(&args, Some(("xterm", Some(size))));
        assert!(t.process.terminal);
        assert_eq!(t.process.console_size, Some(size));
        assert_eq!(t.process.env[1], "TERM=xterm");
    }
}
