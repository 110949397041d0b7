//! Container-wide signals (`SignalContainer`, `kiln kill --all`), for both agent targets.

use std::time::{Duration, Instant};

use kiln_protocol::{ErrorKind, ExitStatus, INIT_EXEC_ID};

use super::{agent_error, sh, Target};

/// Command lines of the live processes of container `id` (zombies have none), listed by an
/// exec'd shell through the container's /proc; `n` numbers the exec ids.
fn container_cmdlines(t: &Target, id: &str, n: &mut u32) -> String {
    *n += 1;
    let list = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";
    let (status, out, err) = t.run(id, &format!("ps{n}"), sh(list));
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    out
}

/// Lists container `id`'s processes until `done(list)` holds (60 s at most).
fn wait_cmdlines(t: &Target, id: &str, n: &mut u32, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = container_cmdlines(t, id, n);
        if done(&ps) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within 60 s: {ps}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `SignalContainer` (`kiln kill --all`): TERM reaches every process of the container, also a
/// background child the agent never registered; the pid namespace's init, which has no TERM
/// handler, ignores it (as under runc); KILL then ends the container. Uses container `ka`.
pub fn case_signal_all(t: &Target) {
    let c = &t.client;
    t.sleeper("ka", true);
    // `bg` forks an unregistered `sleep 2001`, then becomes `sleep 2002` itself.
    c.exec("ka", "bg", sh("sleep 2001 & exec sleep 2002"))
        .unwrap();
    c.close_stdin("ka", "bg").unwrap();
    let mut n = 0;
    wait_cmdlines(t, "ka", &mut n, "both sleeps running", |ps| {
        ps.contains("sleep 2001") && ps.contains("sleep 2002")
    });
    c.signal_container("ka", libc::SIGTERM).unwrap();
    assert_eq!(
        c.wait("ka", "bg").unwrap(),
        ExitStatus::Signaled(libc::SIGTERM)
    );
    wait_cmdlines(t, "ka", &mut n, "the background sleep gone", |ps| {
        !ps.contains("sleep 2001") && !ps.contains("sleep 2002")
    });
    let ps = container_cmdlines(t, "ka", &mut n);
    assert!(ps.contains("sleep 1000000"), "{ps}");
    assert_eq!(
        agent_error(c.signal_container("ka", 0).unwrap_err()),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        agent_error(c.signal_container("nope", libc::SIGTERM).unwrap_err()),
        ErrorKind::NotFound
    );
    c.signal_container("ka", libc::SIGKILL).unwrap();
    assert_eq!(
        c.wait("ka", INIT_EXEC_ID).unwrap(),
        ExitStatus::Signaled(libc::SIGKILL)
    );
    c.remove("ka", true).unwrap();
}
