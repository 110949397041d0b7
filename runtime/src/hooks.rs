//! OCI hooks that run on the host: `createRuntime` (and the deprecated `prestart`) once the VM
//! and the container exist, `poststart` after the process started, `poststop` when the container
//! is deleted. Each gets the container's state JSON on stdin, as the runtime spec says.
//!
//! `createContainer` and `startContainer` hooks would have to run inside the container, that is
//! inside the VM, which the agent cannot do: a bundle that has them is refused.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Hooks kiln cannot run.
    #[error("{0} hooks are not supported: they would run inside the VM")]
    Unsupported(&'static str),
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

/// Refuses hooks that would have to run in the guest.
pub fn check(spec: &Spec) -> Result<(), HookError> {
    let Some(h) = spec.hooks() else { return Ok(()) };
    if h.create_container().as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(HookError::Unsupported("createContainer"));
    }
    if h.start_container().as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(HookError::Unsupported("startContainer"));
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
        check(&s).unwrap();
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run(&s, Stage::CreateRuntime, &state).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["id"], "c1");
        run(&s, Stage::Poststart, &state).unwrap();
        let err = run(&s, Stage::Poststop, &state).unwrap_err().to_string();
        assert!(err.contains("poststop hook /bin/sh failed"), "{err}");
        let s = spec(r#"{"createContainer":[{"path":"/bin/true"}]}"#);
        assert!(check(&s).is_err());
    }
}
