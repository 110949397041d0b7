//! One protocol connection: the opening frame decides whether it is a control connection (Hello,
//! then framed requests, responses and events) or a stdio connection (Attach, then raw bytes).
//!
//! Bad input never ends the agent: an oversize length, a malformed body or a wrong version gets an
//! error frame; on a control connection the decoder skips the bad frame and serving goes on.
//! Each request runs on its own thread so slow calls (`WaitProcess`) do not hold up others;
//! responses and events share the connection's writer under a mutex.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};

use kiln_protocol::codec::{self, FrameDecoder, FrameError};
use kiln_protocol::handshake::{self, Opening};
use kiln_protocol::{
    AgentInfo, AgentMessage, ErrorKind, ErrorReply, HostMessage, Request, Response,
    PROTOCOL_VERSION,
};

use crate::agent::{err, Agent};

/// Agent name sent in `HelloOk` and `Version`.
pub const AGENT_NAME: &str = concat!("kiln-guest-init ", env!("CARGO_PKG_VERSION"));

/// Calls in flight on one control connection (each runs on its own thread).
const MAX_IN_FLIGHT: usize = 256;

/// Opening frames tolerated before a connection is dropped (after errors).
const MAX_OPENING_ATTEMPTS: usize = 8;

const THREAD_STACK: usize = 256 * 1024;

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, msg: &AgentMessage) -> bool {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    codec::write_frame(&mut *f, msg).is_ok()
}

fn send_error(w: &Writer, e: ErrorReply) -> bool {
    log::debug!("connection error reply: {e}");
    send(w, &AgentMessage::Error(e))
}

fn frame_error_reply(e: &FrameError) -> ErrorReply {
    match e {
        FrameError::TooLarge { .. } => err(ErrorKind::FrameTooLarge, e.to_string()),
        _ => err(ErrorKind::MalformedFrame, kiln_protocol::error_chain(e)),
    }
}

/// Serves one accepted connection until it closes.
pub fn serve(agent: Arc<Agent>, conn: File) {
    let writer: Writer = match conn.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            log::warn!("dup of a connection failed: {e}");
            return;
        }
    };
    let mut reader = conn;
    for _ in 0..MAX_OPENING_ATTEMPTS {
        let body = match codec::read_frame_body(&mut reader) {
            Ok(body) => body,
            Err(FrameError::Closed) => return,
            Err(e @ FrameError::TooLarge { .. }) => {
                // The oversize body is still on the wire; we cannot resynchronise an opening.
                send_error(&writer, frame_error_reply(&e));
                return;
            }
            Err(e) => {
                log::debug!("connection ended in its opening frame: {e}");
                return;
            }
        };
        match handshake::open_connection(&body) {
            Ok(Opening::Control(hello)) => {
                log::debug!("control connection from {}", hello.client);
                if send(&writer, &handshake::hello_ok(AGENT_NAME)) {
                    serve_control(&agent, reader, writer);
                }
                return;
            }
            Ok(Opening::Stdio(attach)) => {
                drop(writer);
                if let Err(e) = agent.attach(&attach, reader) {
                    log::debug!("attach refused: {e}");
                }
                return;
            }
            Err(e) => {
                if !send_error(&writer, e) {
                    return;
                }
            }
        }
    }
}

fn serve_control(agent: &Arc<Agent>, mut reader: File, writer: Writer) {
    let (tx, rx) = mpsc::channel::<AgentMessage>();
    agent.subscribe(tx);
    let events_writer = writer.clone();
    let forwarder = std::thread::Builder::new()
        .name("events".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for msg in rx {
                if !send(&events_writer, &msg) {
                    break;
                }
            }
        });
    if forwarder.is_err() {
        send_error(
            &writer,
            err(ErrorKind::ResourceExhausted, "no thread for events"),
        );
        return;
    }
    let in_flight: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut decoder = FrameDecoder::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        decoder.feed(&chunk[..n]);
        loop {
            match decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(body)) => handle_frame(agent, &writer, &in_flight, &body),
                Err(e) => {
                    if !send_error(&writer, frame_error_reply(&e)) {
                        return;
                    }
                }
            }
        }
    }
    // Dropping the writer clones ends the events forwarder when its channel send fails.
    if let Ok(f) = writer.lock() {
        crate::stdio::shutdown(&f, std::net::Shutdown::Both);
    }
}

fn handle_frame(
    agent: &Arc<Agent>,
    writer: &Writer,
    in_flight: &Arc<Mutex<HashSet<u64>>>,
    body: &[u8],
) {
    let msg = match codec::decode_body::<HostMessage>(body) {
        Ok(m) => m,
        Err(e) => {
            let reply = err(
                ErrorKind::MalformedFrame,
                format!("malformed frame: {}", kiln_protocol::error_chain(&e)),
            );
            match codec::peek_request_id(body) {
                Some(id) => send(
                    writer,
                    &AgentMessage::Response {
                        id,
                        response: Response::Error(ErrorReply::new(
                            ErrorKind::Unsupported,
                            reply.message,
                        )),
                    },
                ),
                None => send_error(writer, reply),
            };
            return;
        }
    };
    let (id, request) = match msg {
        HostMessage::Request { id, request } => (id, request),
        HostMessage::Hello(_) | HostMessage::Attach(_) => {
            send_error(
                writer,
                err(
                    ErrorKind::ProtocolViolation,
                    "Hello/Attach are only allowed as the first frame of a connection",
                ),
            );
            return;
        }
    };
    let admitted = {
        let mut set = in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= MAX_IN_FLIGHT {
            Err(err(
                ErrorKind::ResourceExhausted,
                format!("at most {MAX_IN_FLIGHT} calls in flight per connection"),
            ))
        } else if !set.insert(id) {
            Err(err(
                ErrorKind::ProtocolViolation,
                format!("request id {id} is already in flight"),
            ))
        } else {
            Ok(())
        }
    };
    if let Err(e) = admitted {
        send(
            writer,
            &AgentMessage::Response {
                id,
                response: Response::Error(e),
            },
        );
        return;
    }
    let shutdown = matches!(request, Request::Shutdown);
    let (agent2, writer2, in_flight2) = (agent.clone(), writer.clone(), in_flight.clone());
    let run = move || {
        let response = dispatch(&agent2, request).unwrap_or_else(Response::Error);
        in_flight2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        send(&writer2, &AgentMessage::Response { id, response });
        if shutdown {
            crate::power::shutdown(&agent2);
        }
    };
    let spawned = std::thread::Builder::new()
        .name(format!("req-{id}"))
        .stack_size(THREAD_STACK)
        .spawn(run);
    if spawned.is_err() {
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        send(
            writer,
            &AgentMessage::Response {
                id,
                response: Response::Error(err(
                    ErrorKind::ResourceExhausted,
                    "cannot start a thread for the request",
                )),
            },
        );
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn dispatch(agent: &Agent, request: Request) -> Result<Response, ErrorReply> {
    Ok(match request {
        Request::Health => Response::Ok,
        Request::Version => Response::Version(AgentInfo {
            version: PROTOCOL_VERSION,
            agent: AGENT_NAME.to_string(),
            kernel: kernel_release(),
        }),
        Request::CreateContainer { container_id, spec } => Response::Process {
            pid: agent.create_container(&container_id, &spec)?,
        },
        Request::CreateContainerSeccomp {
            container_id,
            mut spec,
            seccomp,
        } => {
            spec.seccomp = Some(*seccomp);
            Response::Process {
                pid: agent.create_container(&container_id, &spec)?,
            }
        }
        Request::StartContainer { container_id } => {
            agent.start_container(&container_id)?;
            Response::Ok
        }
        Request::ExecProcess {
            container_id,
            exec_id,
            process,
        } => Response::Process {
            pid: agent.exec_process(&container_id, &exec_id, &process)?,
        },
        Request::SignalProcess {
            container_id,
            exec_id,
            signal,
        } => {
            agent.signal_process(&container_id, &exec_id, signal)?;
            Response::Ok
        }
        Request::WaitProcess {
            container_id,
            exec_id,
        } => Response::Exited(agent.wait(&container_id, &exec_id)?),
        Request::CloseStdin {
            container_id,
            exec_id,
        } => {
            agent.close_stdin(&container_id, &exec_id)?;
            Response::Ok
        }
        Request::ResizeTty {
            container_id,
            exec_id,
            size,
        } => {
            agent.resize_tty(&container_id, &exec_id, size)?;
            Response::Ok
        }
        Request::Stats { container_id } => Response::Stats(agent.stats(&container_id)?),
        Request::RemoveContainer {
            container_id,
            force,
        } => {
            agent.remove_container(&container_id, force)?;
            Response::Ok
        }
        Request::Shutdown => Response::Ok,
        Request::SignalContainer {
            container_id,
            signal,
        } => {
            agent.signal_container(&container_id, signal)?;
            Response::Ok
        }
    })
}
