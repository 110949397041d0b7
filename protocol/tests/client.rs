//! AgentClient against a scripted fake agent over a unix socket pair: handshake outcomes,
//! concurrent calls answered out of order, events, agent errors, disconnects, timeouts.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use kiln_protocol::codec::read_frame_body;
use kiln_protocol::handshake::{hello_ok, open_connection, Opening};
use kiln_protocol::{
    read_frame, write_frame, AgentClient, AgentInfo, AgentMessage, ClientError, ContainerSpec,
    ContainerStats, ErrorKind, ErrorReply, Event, ExitStatus, HelloOk, HostMessage, ProcessSpec,
    ProtocolVersion, Request, Response, PROTOCOL_VERSION,
};

/// Exit code the fake agent reports for an exec id: its length.
fn code_of(exec_id: &str) -> i32 {
    exec_id.len() as i32
}

/// Serves one control connection like a (very small) agent. WaitProcess is answered 50 ms
/// later from another thread, so answers arrive out of order.
fn fake_agent(stream: UnixStream) {
    let mut reader = stream.try_clone().unwrap();
    let body = read_frame_body(&mut reader).unwrap();
    let writer = Arc::new(std::sync::Mutex::new(stream));
    let send = {
        let writer = Arc::clone(&writer);
        move |msg: AgentMessage| {
            let _ = write_frame(&mut *writer.lock().unwrap(), &msg);
        }
    };
    match open_connection(&body) {
        Ok(Opening::Control(_)) => send(hello_ok("fake-agent")),
        Ok(Opening::Stdio(_)) => panic!("fake agent got Attach"),
        Err(e) => return send(AgentMessage::Error(e)),
    }
    loop {
        let Ok(msg) = read_frame::<_, HostMessage>(&mut reader) else {
            return;
        };
        let HostMessage::Request { id, request } = msg else {
            panic!("unexpected {msg:?}");
        };
        let reply = |response| AgentMessage::Response { id, response };
        match request {
            Request::Health | Request::StartContainer { .. } | Request::SignalContainer { .. } => {
                send(reply(Response::Ok))
            }
            Request::Version => send(reply(Response::Version(AgentInfo {
                version: PROTOCOL_VERSION,
                agent: "fake-agent".into(),
                kernel: "none".into(),
            }))),
            Request::CreateContainer { .. } => send(reply(Response::Process { pid: 100 })),
            // Answers with the number of syscalls entries, so the test sees the profile arrived.
            Request::CreateContainerSeccomp { spec, seccomp, .. } => {
                assert!(spec.seccomp.is_none(), "the spec's own copy is not encoded");
                send(reply(Response::Process {
                    pid: 200 + seccomp.syscalls.len() as u32,
                }))
            }
            Request::ExecProcess { exec_id, .. } => {
                send(reply(Response::Process {
                    pid: 1000 + code_of(&exec_id) as u32,
                }));
            }
            Request::WaitProcess {
                container_id,
                exec_id,
            } => {
                let send = send.clone();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(50));
                    let status = ExitStatus::Exited(code_of(&exec_id));
                    send(AgentMessage::Event(Event::ProcessExited {
                        container_id,
                        exec_id,
                        status,
                    }));
                    send(AgentMessage::Response {
                        id,
                        response: Response::Exited(status),
                    });
                });
            }
            Request::SignalProcess { .. } => send(reply(Response::Error(ErrorReply::new(
                ErrorKind::NotFound,
                "no such process",
            )))),
            Request::Stats { .. } => send(reply(Response::Stats(ContainerStats {
                pids_current: 3,
                ..ContainerStats::default()
            }))),
            // Never answered: for timeouts.
            Request::CloseStdin { .. } => {}
            // An answer that does not decode (unknown Response variant) for this id.
            Request::ResizeTty { .. } => {
                let mut body = 2u32.to_le_bytes().to_vec();
                body.extend(id.to_le_bytes());
                body.extend(77u32.to_le_bytes());
                let mut w = writer.lock().unwrap();
                std::io::Write::write_all(&mut *w, &(body.len() as u32).to_le_bytes()).unwrap();
                std::io::Write::write_all(&mut *w, &body).unwrap();
            }
            Request::Shutdown => {
                send(reply(Response::Ok));
                let _ = writer.lock().unwrap().shutdown(std::net::Shutdown::Both);
                return;
            }
            Request::RemoveContainer { .. } => {
                // Disconnect in the middle of the call.
                let _ = writer.lock().unwrap().shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

fn connected() -> AgentClient {
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || fake_agent(guest));
    AgentClient::connect(host, "test").unwrap()
}

#[test]
fn create_container_with_seccomp_sends_the_profile() {
    let client = connected();
    let spec = ContainerSpec {
        seccomp: Some(kiln_protocol::SeccompProfile {
            default_action: "SCMP_ACT_ALLOW".into(),
            syscalls: vec![kiln_protocol::SeccompSyscall::default(); 2],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(client.create_container("c", spec).unwrap(), 202);
    assert_eq!(
        client
            .create_container("d", ContainerSpec::default())
            .unwrap(),
        100
    );
}

#[test]
fn handshake_and_simple_calls() {
    let client = connected();
    assert_eq!(client.agent().agent, "fake-agent");
    client.health().unwrap();
    assert_eq!(client.version().unwrap().agent, "fake-agent");
    assert_eq!(
        client
            .create_container("c", ContainerSpec::default())
            .unwrap(),
        100
    );
    client.start("c").unwrap();
    assert_eq!(client.stats("c").unwrap().pids_current, 3);
    client.shutdown().unwrap();
}

#[test]
fn concurrent_calls_get_their_own_answers_and_events_arrive() {
    let client = Arc::new(connected());
    let events = client.take_events().unwrap();
    assert!(client.take_events().is_none());
    let threads: Vec<_> = (1..=16)
        .map(|n| {
            let client = Arc::clone(&client);
            thread::spawn(move || {
                let exec_id = "x".repeat(n);
                let pid = client.exec("c", &exec_id, ProcessSpec::default()).unwrap();
                assert_eq!(pid, 1000 + n as u32);
                // Waits are answered late; health calls made meanwhile come back first.
                let waiter = {
                    let client = Arc::clone(&client);
                    let exec_id = exec_id.clone();
                    thread::spawn(move || client.wait("c", &exec_id).unwrap())
                };
                client.health().unwrap();
                assert_eq!(waiter.join().unwrap(), ExitStatus::Exited(n as i32));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut codes: Vec<i32> = (0..16)
        .map(
            |_| match events.recv_timeout(Duration::from_secs(5)).unwrap() {
                Event::ProcessExited { status, .. } => status.shell_code(),
                other => panic!("unexpected event {other:?}"),
            },
        )
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, (1..=16).collect::<Vec<_>>());
    assert_eq!(client.dropped_events(), 0);
}

#[test]
fn agent_errors_timeouts_and_malformed_answers_fail_only_their_call() {
    let client = connected();
    match client.signal("c", "e", 15) {
        Err(ClientError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("expected an agent error, got {other:?}"),
    }
    let timeout = Duration::from_millis(100);
    assert!(matches!(
        client.call_timeout(
            Request::CloseStdin {
                container_id: "c".into(),
                exec_id: "e".into()
            },
            timeout
        ),
        Err(ClientError::Timeout(_))
    ));
    let resize = client.resize_tty("c", "e", kiln_protocol::TtySize { rows: 1, cols: 1 });
    assert!(
        matches!(resize, Err(ClientError::MalformedResponse(_))),
        "{resize:?}"
    );
    client.health().unwrap();
}

#[test]
fn disconnect_fails_calls_in_flight_and_later_calls() {
    let client = connected();
    match client.remove("c", false) {
        Err(ClientError::Disconnected(reason)) => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(
        client.health(),
        Err(ClientError::Disconnected(_) | ClientError::Send(_))
    ));
}

/// Runs `agent` on the guest end of a pair and connects a client on the other.
fn connect_to(agent: impl FnOnce(UnixStream) + Send + 'static) -> Result<AgentClient, ClientError> {
    let (host, guest) = UnixStream::pair().unwrap();
    thread::spawn(move || agent(guest));
    AgentClient::connect(host, "test")
}

#[test]
fn refused_and_incompatible_handshakes_are_clear_errors() {
    // The agent refuses (e.g. our major is too new for it).
    let refused = connect_to(|mut s| {
        let _ = read_frame_body(&mut s);
        let reply = ErrorReply::new(ErrorKind::IncompatibleVersion, "speak 9.0");
        write_frame(&mut s, &AgentMessage::Error(reply)).unwrap();
    });
    match refused {
        Err(ClientError::Refused(e)) => assert_eq!(e.kind, ErrorKind::IncompatibleVersion),
        other => panic!("expected Refused, got {other:?}"),
    }
    // The agent accepts but is of another major version: the client refuses.
    let newer = connect_to(|mut s| {
        let _ = read_frame_body(&mut s);
        let ok = HelloOk {
            version: ProtocolVersion { major: 2, minor: 0 },
            agent: "future".into(),
        };
        write_frame(&mut s, &AgentMessage::HelloOk(ok)).unwrap();
    });
    let err = newer.unwrap_err();
    assert!(matches!(err, ClientError::IncompatibleVersion { .. }));
    assert!(err.to_string().contains("2.0"), "{err}");
    // The agent hangs up.
    let closed = connect_to(drop);
    assert!(matches!(closed, Err(ClientError::Handshake(_))));
}
