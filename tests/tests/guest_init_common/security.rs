//! `process.capabilities` and `linux.seccomp`, for both agent targets: what the container's
//! processes see in `/proc/self/status` and what the kernel refuses them.

use kiln_protocol::client::ClientError;
use kiln_protocol::{
    Capabilities, ContainerSpec, ErrorKind, ExitStatus, SeccompArg, SeccompProfile, SeccompSyscall,
    StdioStream, INIT_EXEC_ID,
};

use super::{agent_error, read_all, sh, spec, Target};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Creates container `id` from `s`, attaches its main process's stdout and stderr, starts it
/// and waits: (status, stdout, stderr).
fn run_main(t: &Target, id: &str, s: ContainerSpec) -> (ExitStatus, String, String) {
    let c = &t.client;
    c.create_container(id, s).expect("create");
    c.close_stdin(id, INIT_EXEC_ID).expect("close stdin");
    let out = t.attach(id, INIT_EXEC_ID, StdioStream::Stdout);
    let err = t.attach(id, INIT_EXEC_ID, StdioStream::Stderr);
    let err_reader = std::thread::spawn(move || read_all(err));
    c.start(id).expect("start");
    let out = read_all(out);
    let err = kiln_tests::bounded::join(err_reader, kiln_tests::bounded::WAIT, "stderr");
    let status = c.wait(id, INIT_EXEC_ID).expect("wait");
    (
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// The `Cap*:` lines of `/proc/self/status` as (name, mask).
fn cap_lines(out: &str) -> Vec<(String, u64)> {
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.starts_with("Cap")
                .then(|| (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap()))
        })
        .collect()
}

fn caps(bounding: &[&str], eff_perm: &[&str], inh: &[&str], amb: &[&str]) -> Capabilities {
    Capabilities {
        bounding: names(bounding),
        effective: names(eff_perm),
        permitted: names(eff_perm),
        inheritable: names(inh),
        ambient: names(amb),
    }
}

const SHOW_CAPS: &str = "grep ^Cap /proc/self/status";

/// Main process limited to CAP_CHOWN (root: chown works, mknod does not); an exec'd non-root
/// process with an ambient capability (kept across the uid switch); an exec'd process without
/// `capabilities` keeps every capability; unknown names are refused naming the capability.
/// Uses containers `cap1`, `cap2`.
pub fn case_capabilities(t: &Target) {
    let c = &t.client;
    let mut s = spec(
        sh(&format!(
            "{SHOW_CAPS}; touch /tmp/f; chown 5 /tmp/f && echo chown-ok; \
             mknod /tmp/n c 1 3 2>/dev/null && echo mknod-ok || echo mknod-denied"
        )),
        true,
    );
    s.process.capabilities = Some(caps(&["CAP_CHOWN"], &["CAP_CHOWN"], &[], &[]));
    let (status, out, err) = run_main(t, "cap1", s);
    assert_eq!(status, ExitStatus::Exited(0), "{out} {err}");
    let chown = 1u64;
    assert_eq!(
        cap_lines(&out),
        [
            ("CapInh".to_string(), 0),
            ("CapPrm".to_string(), chown),
            ("CapEff".to_string(), chown),
            ("CapBnd".to_string(), chown),
            ("CapAmb".to_string(), 0),
        ],
        "{out}"
    );
    assert!(out.contains("chown-ok\nmknod-denied"), "{out} {err}");
    c.remove("cap1", true).unwrap();

    t.sleeper("cap2", true);
    // uid 1000 with CAP_NET_BIND_SERVICE (10) ambient: after exec it is all the process has.
    let mut p = sh(&format!("{SHOW_CAPS}; id -u"));
    p.user.uid = 1000;
    p.user.gid = 1000;
    p.capabilities = Some(caps(
        &["CAP_KILL", "CAP_NET_BIND_SERVICE"],
        &["CAP_KILL", "CAP_NET_BIND_SERVICE"],
        &["CAP_NET_BIND_SERVICE"],
        &["CAP_NET_BIND_SERVICE"],
    ));
    let (status, out, err) = t.run("cap2", "amb", p);
    assert_eq!(status, ExitStatus::Exited(0), "{out} {err}");
    let nbs = 1u64 << 10;
    let kill = 1u64 << 5;
    assert_eq!(
        cap_lines(&out),
        [
            ("CapInh".to_string(), nbs),
            ("CapPrm".to_string(), nbs),
            ("CapEff".to_string(), nbs),
            ("CapBnd".to_string(), nbs | kill),
            ("CapAmb".to_string(), nbs),
        ],
        "{out}"
    );
    assert!(out.ends_with("1000\n"), "{out}");

    // No `capabilities`: root keeps everything the kernel has.
    let (status, out, err) = t.run(
        "cap2",
        "all",
        sh(&format!("{SHOW_CAPS}; cat /proc/sys/kernel/cap_last_cap")),
    );
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    // The agent's own sets (all the kernel has in a VM; a test host may have dropped some).
    let last: u32 = out.lines().last().unwrap().parse().unwrap();
    let lines = cap_lines(&out);
    let bnd = lines[3].1;
    assert!(bnd.count_ones() >= last - 2, "{out}");
    assert_eq!(lines[1], ("CapPrm".to_string(), bnd), "{out}");
    assert_eq!(lines[2], ("CapEff".to_string(), bnd), "{out}");

    let mut p = sh("true");
    p.capabilities = Some(caps(&["CAP_CHOWN", "CAP_TELEPORT"], &[], &[], &[]));
    match c.exec("cap2", "bad", p).unwrap_err() {
        ClientError::Agent(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains("CAP_TELEPORT"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    c.remove("cap2", true).unwrap();
}

fn rule(
    names_: &[&str],
    action: &str,
    errno: Option<u32>,
    args: Vec<SeccompArg>,
) -> SeccompSyscall {
    SeccompSyscall {
        names: names(names_),
        action: action.into(),
        errno_ret: errno,
        args,
    }
}

/// A profile that allows everything but `mkdir` (EPERM) and `kill` with signal 10 (SIGUSR1,
/// an argument condition), plus a name the x86_64 table does not know.
fn deny_mkdir_profile() -> SeccompProfile {
    SeccompProfile {
        default_action: "SCMP_ACT_ALLOW".into(),
        default_errno_ret: None,
        architectures: names(&["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
        flags: vec![],
        syscalls: vec![
            rule(
                &["mkdir", "mkdirat", "no_such_syscall"],
                "SCMP_ACT_ERRNO",
                Some(1),
                vec![],
            ),
            rule(
                &["kill"],
                "SCMP_ACT_ERRNO",
                None,
                vec![SeccompArg {
                    index: 1,
                    value: 10,
                    value_two: 0,
                    op: "SCMP_CMP_EQ".into(),
                }],
            ),
        ],
    }
}

/// `linux.seccomp`: `mkdir` fails with EPERM while other calls work, `kill` fails only for
/// SIGUSR1 (argument condition), in the main process (no no_new_privs: the filter goes in
/// before the capabilities are dropped) and in an exec'd non-root process with no_new_privs and
/// capabilities (filter last); a malformed profile is refused. Uses containers `sc1`, `sc2`.
pub fn case_seccomp(t: &Target) {
    let c = &t.client;
    let script = "grep ^Seccomp: /proc/self/status | tr -d '\\t '; \
                  mkdir /tmp/x 2>&1 || echo mkdir-failed; \
                  touch /tmp/y && echo touch-ok; \
                  sleep 100 & p=$!; \
                  kill -USR1 $p 2>&1 || echo usr1-failed; \
                  kill -TERM $p && echo term-ok; wait";
    let mut s = spec(sh(script), true);
    s.process.capabilities = Some(caps(
        &["CAP_CHOWN", "CAP_KILL"],
        &["CAP_CHOWN", "CAP_KILL"],
        &[],
        &[],
    ));
    s.seccomp = Some(deny_mkdir_profile());
    let (status, out, err) = run_main(t, "sc1", s);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 6, "{out} {err} {status:?}");
    assert_eq!(lines[0], "Seccomp:2", "{out}");
    assert!(lines[1].contains("Operation not permitted"), "{out}");
    assert_eq!(lines[2..4], ["mkdir-failed", "touch-ok"], "{out}");
    assert!(lines[4].contains("Operation not permitted"), "{out}");
    assert_eq!(lines[5..], ["usr1-failed", "term-ok"], "{out} {err}");
    c.remove("sc1", true).unwrap();

    // The container's profile also applies to exec'd processes; here non-root with
    // no_new_privs and capabilities.
    let mut s = spec(super::process(&["sleep", "1000000"]), true);
    s.seccomp = Some(deny_mkdir_profile());
    c.create_container("sc2", s).unwrap();
    c.start("sc2").unwrap();
    let mut p = sh(
        "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status | tr -d '\\t '; \
                    mkdir /tmp/d 2>&1 || echo mkdir-failed; ls -d /tmp && echo ls-ok",
    );
    p.user.uid = 1000;
    p.user.gid = 1000;
    p.no_new_privileges = true;
    p.capabilities = Some(caps(
        &["CAP_KILL"],
        &["CAP_KILL"],
        &["CAP_KILL"],
        &["CAP_KILL"],
    ));
    let (status, out, err) = t.run("sc2", "e1", p);
    assert_eq!(status, ExitStatus::Exited(0), "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..3],
        ["CapEff:0000000000000020", "NoNewPrivs:1", "Seccomp:2"],
        "{out}"
    );
    assert!(lines[3].contains("Operation not permitted"), "{out}");
    assert_eq!(lines[4..], ["mkdir-failed", "/tmp", "ls-ok"], "{out}");

    // A malformed operator: refused at create, naming it.
    let mut bad = deny_mkdir_profile();
    bad.syscalls[1].args[0].op = "SCMP_CMP_ROUGHLY".into();
    let mut s = spec(sh("true"), true);
    s.seccomp = Some(bad);
    let e = c.create_container("sc3", s).unwrap_err();
    match &e {
        ClientError::Agent(r) => assert!(r.message.contains("SCMP_CMP_ROUGHLY"), "{r}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(agent_error(e), ErrorKind::InvalidArgument);
    c.remove("sc2", true).unwrap();
}
