//! OCI hooks. On the host: `createRuntime` (and the deprecated `prestart`) once the VM and the
//! container exist, `poststart` after the process started, `poststop` when the container is
//! deleted. In the guest, inside the container ([`run_in_guest`]): `createContainer` at the end of
//! `create` and `startContainer` just before the process starts, run by the agent like an exec'd
//! process. Each hook gets the container's state JSON on stdin, as the runtime spec says.
//!
//! The spec resolves a `createContainer` hook's path in the runtime namespace, but runs it in the
//! container namespace. A microVM's container namespace is not reachable from the host, and a host
//! binary cannot run in the guest; kiln resolves that path inside the container, as it must for
//! `startContainer`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_protocol::transport::{hybrid_vsock_attach, hybrid_vsock_connect};
use kiln_protocol::{
    AgentClient, ClientError, ExitStatus, ProcessSpec, Request, Response, StdioStream,
    AGENT_VSOCK_PORT,
};
use oci_spec::runtime::{Hook, Hooks, Spec};
use thiserror::Error;

/// A hook failed.
#[derive(Debug, Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("{stage} hook {path}: cannot run")]
    Spawn {
        /// Which stage.
        stage: &'static str,
        /// The program.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hook exited unsuccessfully or timed out.
    #[error("{stage} hook {path} failed: {why}")]
    Failed {
        /// Which stage.
        stage: &'static str,
        /// The program.
        path: String,
        /// Exit status or timeout.
        why: String,
    },
    /// Talking to the agent about an in-guest hook failed.
    #[error("{stage} hook {path}: {what}")]
    Agent {
        /// Which stage.
        stage: &'static str,
        /// The program (inside the container).
        path: String,
        /// What was being done.
        what: &'static str,
        /// The agent's or the transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Stages that run on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `createRuntime` and `prestart`.
    CreateRuntime,
    /// `poststart`.
    Poststart,
    /// `poststop`.
    Poststop,
}

/// Stages that run inside the container, in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStage {
    /// `createContainer`, at the end of `create`.
    CreateContainer,
    /// `startContainer`, at `start` before the process runs.
    StartContainer,
}

impl GuestStage {
    fn name(self) -> &'static str {
        match self {
            GuestStage::CreateContainer => "createContainer",
            GuestStage::StartContainer => "startContainer",
        }
    }

    fn hooks(self, h: &Hooks) -> Vec<Hook> {
        match self {
            GuestStage::CreateContainer => h.create_container().clone().unwrap_or_default(),
            GuestStage::StartContainer => h.start_container().clone().unwrap_or_default(),
        }
    }
}

/// Whether `spec` has hooks of `stage` (so callers connect to the agent only when needed).
pub fn has_guest_hooks(spec: &Spec, stage: GuestStage) -> bool {
    spec.hooks()
        .as_ref()
        .is_some_and(|h| !stage.hooks(h).is_empty())
}

/// The process the agent runs for one in-guest hook: `path` with `args[1..]` (the agent has no
/// separate argv0), as root in `/`, with the hook's `env`, or without one the container
/// process's environment (as runc, whose in-container hooks run from the prepared init).
fn hook_process(hook: &Hook, spec: &Spec) -> ProcessSpec {
    let mut args = vec![hook.path().display().to_string()];
    if let Some(rest) = hook.args().as_ref().and_then(|a| a.split_first()) {
        args.extend(rest.1.iter().cloned());
    }
    let env = match hook.env() {
        Some(env) => env.clone(),
        None => spec
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default(),
    };
    ProcessSpec {
        args,
        env,
        cwd: "/".into(),
        ..ProcessSpec::default()
    }
}

fn hook_timeout(hook: &Hook) -> Option<Duration> {
    hook.timeout()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .map(Duration::from_secs)
}

/// Runs the hooks of `stage` in order inside container `id`, through the agent behind `uds`,
/// with `state` on stdin. A hook's stderr goes to ours, its stdout is discarded. Stops at the
/// first failure (non-zero exit, signal, or `timeout`, after which the hook is killed).
pub fn run_in_guest(
    spec: &Spec,
    stage: GuestStage,
    state: &serde_json::Value,
    uds: &Path,
    id: &str,
) -> Result<(), HookError> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    let hooks = stage.hooks(h);
    if hooks.is_empty() {
        return Ok(());
    }
    let name = stage.name();
    let agent_err = |path: &str, what: &'static str| {
        let path = path.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| HookError::Agent {
            stage: name,
            path: path.clone(),
            what,
            source: e,
        }
    };
    let stream = hybrid_vsock_connect(uds, AGENT_VSOCK_PORT)
        .map_err(|e| agent_err("-", "connecting to the agent")(Box::new(e)))?;
    let client = AgentClient::connect(stream, "kiln hook")
        .map_err(|e| agent_err("-", "handshake with the agent")(Box::new(e)))?;
    let input = state.to_string();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    for (i, hook) in hooks.iter().enumerate() {
        let path = hook.path().display().to_string();
        let exec_id = format!("kiln-hook-{name}-{i}-{stamp}");
        client
            .exec(id, &exec_id, hook_process(hook, spec))
            .map_err(|e| agent_err(&path, "starting it in the container")(Box::new(e)))?;
        let attach = |which| hybrid_vsock_attach(uds, AGENT_VSOCK_PORT, id, &exec_id, which);
        let mut stdin = attach(StdioStream::Stdin)
            .map_err(|e| agent_err(&path, "attaching its stdin")(Box::new(e)))?;
        let mut outputs = Vec::new();
        for (which, to_stderr) in [(StdioStream::Stdout, false), (StdioStream::Stderr, true)] {
            let mut conn =
                attach(which).map_err(|e| agent_err(&path, "attaching its output")(Box::new(e)))?;
            outputs.push(std::thread::spawn(move || {
                if to_stderr {
                    let _ = std::io::copy(&mut conn, &mut std::io::stderr());
                } else {
                    let _ = std::io::copy(&mut conn, &mut std::io::sink());
                }
            }));
        }
        // A hook that does not read its stdin must not block us: the write is best effort.
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let wait = Request::WaitProcess {
            container_id: id.into(),
            exec_id: exec_id.clone(),
        };
        let reply = match hook_timeout(hook) {
            None => client.call(wait),
            Some(t) => match client.call_timeout(wait.clone(), t) {
                Err(ClientError::Timeout(_)) => {
                    let _ = client.signal(id, &exec_id, libc::SIGKILL);
                    let _ = client.call_timeout(wait, Duration::from_secs(10));
                    return Err(HookError::Failed {
                        stage: name,
                        path,
                        why: format!("timed out after {t:?}"),
                    });
                }
                other => other,
            },
        };
        for t in outputs {
            let _ = t.join();
        }
        match reply {
            Ok(Response::Exited(ExitStatus::Exited(0))) => log::debug!("{name} hook {path}: ok"),
            Ok(Response::Exited(status)) => {
                return Err(HookError::Failed {
                    stage: name,
                    path,
                    why: match status {
                        ExitStatus::Exited(c) => format!("exit status {c}"),
                        ExitStatus::Signaled(s) => format!("killed by signal {s}"),
                    },
                })
            }
            Ok(other) => {
                return Err(HookError::Failed {
                    stage: name,
                    path,
                    why: format!("unexpected agent answer {other:?}"),
                })
            }
            Err(e) => return Err(agent_err(&path, "waiting for it")(Box::new(e))),
        }
    }
    Ok(())
}

fn hooks_of(h: &Hooks, stage: Stage) -> Vec<Hook> {
    let mut v = Vec::new();
    match stage {
        Stage::CreateRuntime => {
            #[allow(deprecated)]
            v.extend(h.prestart().clone().unwrap_or_default());
            v.extend(h.create_runtime().clone().unwrap_or_default());
        }
        Stage::Poststart => v.extend(h.poststart().clone().unwrap_or_default()),
        Stage::Poststop => v.extend(h.poststop().clone().unwrap_or_default()),
    }
    v
}

/// Runs the hooks of `stage` in order with `state` (the runtime-spec state JSON) on stdin.
/// Stops at the first failure.
pub fn run(spec: &Spec, stage: Stage, state: &serde_json::Value) -> Result<(), HookError> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    let name = match stage {
        Stage::CreateRuntime => "createRuntime",
        Stage::Poststart => "poststart",
        Stage::Poststop => "poststop",
    };
    let input = state.to_string();
    for hook in hooks_of(h, stage) {
        let path = hook.path().display().to_string();
        let mut cmd = Command::new(hook.path());
        if let Some(args) = hook.args() {
            if let Some((argv0, rest)) = args.split_first() {
                std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
                cmd.args(rest);
            }
        }
        cmd.env_clear();
        for kv in hook.env().clone().unwrap_or_default() {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| HookError::Spawn {
                stage: name,
                path: path.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input.as_bytes());
        }
        let timeout = hook
            .timeout()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0)
            .map(Duration::from_secs);
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Ok(s),
                Ok(None) => {}
                Err(e) => break Err(e.to_string()),
            }
            if timeout.is_some_and(|t| started.elapsed() >= t) {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {:?}", started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match status {
            Ok(s) if s.success() => log::debug!("{name} hook {path}: ok"),
            Ok(s) => {
                return Err(HookError::Failed {
                    stage: name,
                    path,
                    why: s.to_string(),
                })
            }
            Err(why) => {
                return Err(HookError::Failed {
                    stage: name,
                    path,
                    why,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"hooks":{hooks}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn hooks_get_the_state_and_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state");
        let s = spec(&format!(
            r#"{{"createRuntime":[{{"path":"/bin/sh","args":["sh","-c","cat > {}"]}}],
                "poststop":[{{"path":"/bin/sh","args":["sh","-c","exit 3"]}}]}}"#,
            out.display()
        ));
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run(&s, Stage::CreateRuntime, &state).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["id"], "c1");
        run(&s, Stage::Poststart, &state).unwrap();
        let err = run(&s, Stage::Poststop, &state).unwrap_err().to_string();
        assert!(err.contains("poststop hook /bin/sh failed"), "{err}");
    }

    #[test]
    fn guest_hooks_become_agent_processes() {
        let s = spec(
            r#"{"startContainer":[{"path":"/bin/sh","args":["hook-sh","-c","exit 0"],
                "env":["A=1"],"timeout":7}]}"#,
        );
        assert!(has_guest_hooks(&s, GuestStage::StartContainer));
        assert!(!has_guest_hooks(&s, GuestStage::CreateContainer));
        let h = &GuestStage::StartContainer.hooks(s.hooks().as_ref().unwrap())[0];
        let p = hook_process(h, &s);
        assert_eq!(p.args, ["/bin/sh", "-c", "exit 0"]);
        assert_eq!(p.env, ["A=1"]);
        assert_eq!(p.cwd, "/");
        assert_eq!(p.user.uid, 0);
        assert!(!p.terminal);
        assert_eq!(hook_timeout(h), Some(Duration::from_secs(7)));
        let mut bare = spec(r#"{"createContainer":[{"path":"/hook"}]}"#);
        let h = &GuestStage::CreateContainer.hooks(bare.hooks().as_ref().unwrap())[0];
        assert_eq!(hook_process(h, &bare).args, ["/hook"]);
        // No env: the container process's.
        let mut process = oci_spec::runtime::Process::default();
        process.set_env(Some(vec!["FROM=process".into()]));
        bare.set_process(Some(process));
        assert_eq!(hook_process(h, &bare).env, ["FROM=process"]);
        assert_eq!(hook_timeout(h), None);
    }
}
