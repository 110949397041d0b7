//! Golden byte vectors that freeze the wire format, and round trips of every message.
//!
//! If a golden test fails, the wire format changed: that breaks every deployed agent of the same
//! major version. Append enum variants at the end instead, or bump the major version.

use std::collections::BTreeMap;

use kiln_protocol::codec::{peek_request_id, peek_version};
use kiln_protocol::{
    decode_body, encode_frame, AgentInfo, AgentMessage, Attach, Capabilities, ContainerSpec,
    ContainerStats, ErrorKind, ErrorReply, Event, ExitStatus, Hello, HelloOk, HostMessage,
    IdMapping, LinuxSpec, MountSpec, Namespace, NamespaceKind, ProcessSpec, ProtocolVersion,
    Request, Resources, Response, Rlimit, RootSpec, SeccompArg, SeccompProfile, SeccompSyscall,
    StdioStream, TtySize, User, PROTOCOL_VERSION,
};

/// Builds expected bodies field by field, spelling out the layout: fixed-width little-endian
/// integers, `u32` enum tags, `u64` lengths, `u8` option tags.
#[derive(Default)]
struct Layout(Vec<u8>);

impl Layout {
    fn tag(mut self, variant: u32) -> Self {
        self.0.extend_from_slice(&variant.to_le_bytes());
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bool(mut self, v: bool) -> Self {
        self.0.push(u8::from(v));
        self
    }
    fn none(mut self) -> Self {
        self.0.push(0);
        self
    }
    fn some(mut self) -> Self {
        self.0.push(1);
        self
    }
    fn str(self, s: &str) -> Self {
        let mut me = self.u64(s.len() as u64);
        me.0.extend_from_slice(s.as_bytes());
        me
    }
    fn strs(self, v: &[&str]) -> Self {
        v.iter().fold(self.u64(v.len() as u64), |me, s| me.str(s))
    }
    fn frame(self) -> Vec<u8> {
        let mut f = (self.0.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&self.0);
        f
    }
}

fn check<T>(msg: &T, expected_frame: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let frame = encode_frame(msg).expect("encode");
    assert_eq!(frame, expected_frame, "wire bytes of {msg:?} changed");
    let back: T = decode_body(&frame[4..]).expect("decode");
    assert_eq!(&back, msg);
}

#[test]
fn golden_hello() {
    let msg = HostMessage::Hello(Hello {
        version: ProtocolVersion { major: 1, minor: 0 },
        client: "kiln".into(),
    });
    #[rustfmt::skip]
    let expected = [
        0x14, 0, 0, 0,                  // body length 20
        0, 0, 0, 0,                     // HostMessage::Hello
        1, 0, 0, 0,                     // major 1, minor 0
        4, 0, 0, 0, 0, 0, 0, 0,         // client: 4 bytes
        b'k', b'i', b'l', b'n',
    ];
    check(&msg, &expected);
    assert_eq!(
        peek_version(&expected[4..]),
        Some(ProtocolVersion { major: 1, minor: 0 })
    );
}

#[test]
fn golden_health_request() {
    let msg = HostMessage::Request {
        id: 7,
        request: Request::Health,
    };
    #[rustfmt::skip]
    let expected = [
        0x10, 0, 0, 0,                  // body length 16
        2, 0, 0, 0,                     // HostMessage::Request
        7, 0, 0, 0, 0, 0, 0, 0,         // id 7
        0, 0, 0, 0,                     // Request::Health
    ];
    check(&msg, &expected);
    assert_eq!(peek_request_id(&expected[4..]), Some(7));
}

#[test]
fn golden_wait_response_signaled() {
    let msg = AgentMessage::Response {
        id: 0x0102_0304_0506_0708,
        response: Response::Exited(ExitStatus::Signaled(9)),
    };
    #[rustfmt::skip]
    let expected = [
        0x18, 0, 0, 0,                  // body length 24
        2, 0, 0, 0,                     // AgentMessage::Response
        8, 7, 6, 5, 4, 3, 2, 1,         // id
        3, 0, 0, 0,                     // Response::Exited
        1, 0, 0, 0,                     // ExitStatus::Signaled
        9, 0, 0, 0,                     // SIGKILL
    ];
    check(&msg, &expected);
}

#[test]
fn golden_process_exited_event() {
    let msg = AgentMessage::Event(Event::ProcessExited {
        container_id: "c1".into(),
        exec_id: String::new(),
        status: ExitStatus::Exited(3),
    });
    let expected = Layout::default()
        .tag(3) // AgentMessage::Event
        .tag(0) // Event::ProcessExited
        .str("c1")
        .str("")
        .tag(0) // ExitStatus::Exited
        .i32(3)
        .frame();
    assert_eq!(expected.len(), 4 + 4 + 4 + 10 + 8 + 8);
    check(&msg, &expected);
}

#[test]
fn golden_oom_event_and_error() {
    let oom = AgentMessage::Event(Event::OomKilled {
        container_id: "c".into(),
    });
    check(&oom, &Layout::default().tag(3).tag(1).str("c").frame());

    let err = AgentMessage::Error(ErrorReply::new(ErrorKind::IncompatibleVersion, "no"));
    check(&err, &Layout::default().tag(4).tag(0).str("no").frame());
    let err = AgentMessage::Response {
        id: 1,
        response: Response::Error(ErrorReply::new(ErrorKind::NotFound, "x")),
    };
    check(
        &err,
        &Layout::default()
            .tag(2)
            .u64(1)
            .tag(5)
            .tag(6)
            .str("x")
            .frame(),
    );
}

#[test]
fn golden_attach_and_attach_ok() {
    let msg = HostMessage::Attach(Attach {
        version: PROTOCOL_VERSION,
        container_id: "c".into(),
        exec_id: "e".into(),
        stream: StdioStream::Pty,
    });
    let expected = Layout::default()
        .tag(1) // HostMessage::Attach
        .u16(1)
        .u16(2) // protocol 1.2 (PROTOCOL_VERSION; 1.2 added CreateContainerSeccomp)
        .str("c")
        .str("e")
        .tag(3) // StdioStream::Pty
        .frame();
    check(&msg, &expected);
    assert_eq!(peek_version(&expected[4..]), Some(PROTOCOL_VERSION));
    check(&AgentMessage::AttachOk, &[4, 0, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn golden_stats_response() {
    let msg = AgentMessage::Response {
        id: 2,
        response: Response::Stats(ContainerStats {
            memory_current: 4096,
            memory_max: Some(1 << 20),
            oom_kills: 1,
            cpu_usage_usec: 10,
            cpu_user_usec: 6,
            cpu_system_usec: 4,
            pids_current: 2,
            pids_max: None,
        }),
    };
    let expected = Layout::default()
        .tag(2)
        .u64(2)
        .tag(4) // Response::Stats
        .u64(4096)
        .some()
        .u64(1 << 20)
        .u64(1)
        .u64(10)
        .u64(6)
        .u64(4)
        .u64(2)
        .none()
        .frame();
    check(&msg, &expected);
}

#[test]
fn golden_signal_and_resize() {
    let sig = HostMessage::Request {
        id: 3,
        request: Request::SignalProcess {
            container_id: "c".into(),
            exec_id: String::new(),
            signal: 15,
        },
    };
    check(
        &sig,
        &Layout::default()
            .tag(2)
            .u64(3)
            .tag(5)
            .str("c")
            .str("")
            .i32(15)
            .frame(),
    );
    let resize = HostMessage::Request {
        id: 4,
        request: Request::ResizeTty {
            container_id: "c".into(),
            exec_id: "e".into(),
            size: TtySize { rows: 24, cols: 80 },
        },
    };
    check(
        &resize,
        &Layout::default()
            .tag(2)
            .u64(4)
            .tag(8)
            .str("c")
            .str("e")
            .u16(24)
            .u16(80)
            .frame(),
    );
}

/// `SignalContainer` (protocol 1.1) is appended after `Shutdown`: tag 12.
#[test]
fn golden_signal_container() {
    let msg = HostMessage::Request {
        id: 5,
        request: Request::SignalContainer {
            container_id: "c".into(),
            signal: 15,
        },
    };
    check(
        &msg,
        &Layout::default()
            .tag(2)
            .u64(5)
            .tag(12)
            .str("c")
            .i32(15)
            .frame(),
    );
}

/// A spec that sets every field, so its golden vector freezes the order of all fields.
fn full_spec() -> ContainerSpec {
    ContainerSpec {
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into()],
            env: vec!["A=1".into()],
            cwd: "/".into(),
            user: User {
                uid: 1,
                gid: 2,
                additional_gids: vec![3],
                umask: Some(0o22),
            },
            terminal: true,
            console_size: Some(TtySize { rows: 5, cols: 6 }),
            rlimits: vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 7,
                hard: 8,
            }],
            no_new_privileges: true,
            capabilities: Some(Capabilities {
                bounding: vec!["CAP_KILL".into()],
                ..Capabilities::default()
            }),
            oom_score_adj: Some(-9),
        },
        root: RootSpec {
            device: Some("/dev/vdb".into()),
            fstype: "ext4".into(),
            path: "/run/c".into(),
            readonly: true,
        },
        hostname: Some("h".into()),
        mounts: vec![MountSpec {
            destination: "/proc".into(),
            fstype: Some("proc".into()),
            source: None,
            options: vec!["nosuid".into()],
        }],
        linux: LinuxSpec {
            namespaces: vec![Namespace {
                kind: NamespaceKind::Uts,
                path: None,
            }],
            uid_mappings: vec![IdMapping {
                container_id: 0,
                host_id: 1000,
                size: 1,
            }],
            gid_mappings: vec![],
            resources: Resources {
                memory_limit: Some(1 << 20),
                memory_swap_limit: None,
                cpu_quota: Some(-1),
                cpu_period: Some(100_000),
                cpu_weight: Some(39),
                cpuset_cpus: Some("0".into()),
                cpuset_mems: None,
                pids_limit: Some(10),
            },
            cgroups_path: None,
            sysctl: BTreeMap::from([("k".to_string(), "v".to_string())]),
            masked_paths: vec!["/m".into()],
            readonly_paths: vec![],
        },
        seccomp: None,
    }
}

fn small_profile() -> SeccompProfile {
    SeccompProfile {
        default_action: "SCMP_ACT_ALLOW".into(),
        default_errno_ret: Some(38),
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        flags: vec![],
        syscalls: vec![SeccompSyscall {
            names: vec!["mkdir".into()],
            action: "SCMP_ACT_ERRNO".into(),
            errno_ret: None,
            args: vec![SeccompArg {
                index: 1,
                value: 0o700,
                value_two: 0,
                op: "SCMP_CMP_EQ".into(),
            }],
        }],
    }
}

/// `ContainerSpec::seccomp` is outside the frozen layout (serde skips it): a spec with a
/// profile encodes as `CreateContainer` exactly as the golden vector above, so old agents keep
/// decoding it; the profile travels only in `CreateContainerSeccomp`.
#[test]
fn seccomp_field_does_not_change_create_container() {
    let with = HostMessage::Request {
        id: 9,
        request: Request::CreateContainer {
            container_id: "c".into(),
            spec: Box::new(ContainerSpec {
                seccomp: Some(small_profile()),
                ..full_spec()
            }),
        },
    };
    let without = HostMessage::Request {
        id: 9,
        request: Request::CreateContainer {
            container_id: "c".into(),
            spec: Box::new(full_spec()),
        },
    };
    assert_eq!(
        encode_frame(&with).unwrap(),
        encode_frame(&without).unwrap()
    );
}

/// `CreateContainerSeccomp` (protocol 1.2) is appended after `SignalContainer`: tag 13, then
/// the spec (here the default one) and the profile.
#[test]
fn golden_create_container_seccomp() {
    let msg = HostMessage::Request {
        id: 3,
        request: Request::CreateContainerSeccomp {
            container_id: "c".into(),
            spec: Box::default(),
            seccomp: Box::new(small_profile()),
        },
    };
    let expected = Layout::default()
        .tag(2)
        .u64(3)
        .tag(13) // Request::CreateContainerSeccomp
        .str("c")
        // process: args, env, cwd, uid, gid, additional gids, umask, terminal, console size,
        // rlimits, no_new_privileges, capabilities, oom_score_adj
        .strs(&[])
        .strs(&[])
        .str("")
        .u32(0)
        .u32(0)
        .u64(0)
        .none()
        .bool(false)
        .none()
        .u64(0)
        .bool(false)
        .none()
        .none()
        // root: device, fstype, path, readonly
        .none()
        .str("")
        .str("")
        .bool(false)
        // hostname, mounts
        .none()
        .u64(0)
        // linux: namespaces, mappings, 8 resources, cgroups path, sysctl, masked, readonly
        .u64(0)
        .u64(0)
        .u64(0)
        .none()
        .none()
        .none()
        .none()
        .none()
        .none()
        .none()
        .none()
        .none()
        .u64(0)
        .u64(0)
        .u64(0)
        // profile: default action, default errno, architectures, flags, syscalls
        .str("SCMP_ACT_ALLOW")
        .some()
        .u32(38)
        .strs(&["SCMP_ARCH_X86_64"])
        .strs(&[])
        .u64(1)
        .strs(&["mkdir"])
        .str("SCMP_ACT_ERRNO")
        .none()
        .u64(1)
        .u32(1)
        .u64(0o700)
        .u64(0)
        .str("SCMP_CMP_EQ")
        .frame();
    check(&msg, &expected);
}

#[test]
fn golden_create_container_full_spec() {
    let msg = HostMessage::Request {
        id: 9,
        request: Request::CreateContainer {
            container_id: "c".into(),
            spec: Box::new(full_spec()),
        },
    };
    let expected = Layout::default()
        .tag(2)
        .u64(9)
        .tag(2) // Request::CreateContainer
        .str("c")
        // process
        .strs(&["sh", "-c"])
        .strs(&["A=1"])
        .str("/")
        .u32(1)
        .u32(2)
        .u64(1)
        .u32(3)
        .some()
        .u32(0o22)
        .bool(true)
        .some()
        .u16(5)
        .u16(6)
        .u64(1)
        .str("RLIMIT_NOFILE")
        .u64(7)
        .u64(8)
        .bool(true)
        .some()
        .strs(&["CAP_KILL"])
        .strs(&[])
        .strs(&[])
        .strs(&[])
        .strs(&[])
        .some()
        .i32(-9)
        // root
        .some()
        .str("/dev/vdb")
        .str("ext4")
        .str("/run/c")
        .bool(true)
        // hostname
        .some()
        .str("h")
        // mounts
        .u64(1)
        .str("/proc")
        .some()
        .str("proc")
        .none()
        .strs(&["nosuid"])
        // linux
        .u64(1)
        .tag(4) // NamespaceKind::Uts
        .none()
        .u64(1)
        .u32(0)
        .u32(1000)
        .u32(1)
        .u64(0)
        .some()
        .u64(1 << 20)
        .none()
        .some()
        .i64(-1)
        .some()
        .u64(100_000)
        .some()
        .u64(39)
        .some()
        .str("0")
        .none()
        .some()
        .u64(10)
        .none()
        .u64(1)
        .str("k")
        .str("v")
        .strs(&["/m"])
        .strs(&[])
        .frame();
    check(&msg, &expected);
}

#[test]
fn every_request_round_trips() {
    let requests = vec![
        Request::Health,
        Request::Version,
        Request::CreateContainer {
            container_id: "c".into(),
            spec: Box::new(full_spec()),
        },
        Request::CreateContainer {
            container_id: "d".into(),
            spec: Box::default(),
        },
        Request::StartContainer {
            container_id: "c".into(),
        },
        Request::ExecProcess {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: Box::new(full_spec().process),
        },
        Request::SignalProcess {
            container_id: "c".into(),
            exec_id: "e".into(),
            signal: 2,
        },
        Request::WaitProcess {
            container_id: "c".into(),
            exec_id: "e".into(),
        },
        Request::CloseStdin {
            container_id: "c".into(),
            exec_id: "e".into(),
        },
        Request::ResizeTty {
            container_id: "c".into(),
            exec_id: "e".into(),
            size: TtySize { rows: 1, cols: 2 },
        },
        Request::Stats {
            container_id: "c".into(),
        },
        Request::RemoveContainer {
            container_id: "c".into(),
            force: true,
        },
        Request::Shutdown,
        Request::SignalContainer {
            container_id: "c".into(),
            signal: 9,
        },
        Request::CreateContainerSeccomp {
            container_id: "c".into(),
            spec: Box::new(full_spec()),
            seccomp: Box::new(small_profile()),
        },
    ];
    for (id, request) in requests.into_iter().enumerate() {
        let msg = HostMessage::Request {
            id: id as u64,
            request,
        };
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(peek_request_id(&frame[4..]), Some(id as u64));
        assert_eq!(decode_body::<HostMessage>(&frame[4..]).unwrap(), msg);
    }
}

#[test]
fn every_agent_message_round_trips() {
    let messages = vec![
        AgentMessage::HelloOk(HelloOk {
            version: PROTOCOL_VERSION,
            agent: "kiln-guest-init 0.1.0".into(),
        }),
        AgentMessage::AttachOk,
        AgentMessage::Response {
            id: 1,
            response: Response::Ok,
        },
        AgentMessage::Response {
            id: 2,
            response: Response::Version(AgentInfo {
                version: PROTOCOL_VERSION,
                agent: "a".into(),
                kernel: "6.1.0".into(),
            }),
        },
        AgentMessage::Response {
            id: 3,
            response: Response::Process { pid: 42 },
        },
        AgentMessage::Response {
            id: u64::MAX,
            response: Response::Exited(ExitStatus::Exited(255)),
        },
        AgentMessage::Response {
            id: 5,
            response: Response::Stats(ContainerStats::default()),
        },
        AgentMessage::Event(Event::OomKilled {
            container_id: "c".into(),
        }),
        AgentMessage::Error(ErrorReply::new(ErrorKind::Internal, "bug")),
    ];
    for msg in messages {
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(decode_body::<AgentMessage>(&frame[4..]).unwrap(), msg);
    }
}

#[test]
fn exit_status_shell_codes() {
    assert_eq!(ExitStatus::Exited(3).shell_code(), 3);
    assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
}
