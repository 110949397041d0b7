//! Unit tests of the profile -> BPF compiler: the programs are run by a small classic-BPF
//! interpreter over synthetic `seccomp_data`, and the results compared with the profile's
//! meaning (64-bit argument comparisons checked against Rust's `u64` operators).

use super::*;
use kiln_protocol::SeccompSyscall;

/// Runs `prog` on (arch, nr, args) like the kernel does; panics on anything the compiler must
/// never emit (bad jumps, unknown opcodes, falling off the end).
fn run(prog: &SeccompProgram, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u32; 16];
    data[0] = nr;
    data[1] = arch;
    for (i, a) in args.iter().enumerate() {
        data[4 + 2 * i] = *a as u32;
        data[5 + 2 * i] = (*a >> 32) as u32;
    }
    let f = &prog.filter;
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let insn = f[pc];
        let cond = |taken: bool| pc + 1 + if taken { insn.jt } else { insn.jf } as usize;
        pc = match insn.code {
            LD_ABS_W => {
                assert_eq!(insn.k % 4, 0);
                acc = data[insn.k as usize / 4];
                pc + 1
            }
            AND_K => {
                acc &= insn.k;
                pc + 1
            }
            JEQ_K => cond(acc == insn.k),
            JGT_K => cond(acc > insn.k),
            JGE_K => cond(acc >= insn.k),
            JA => pc + 1 + insn.k as usize,
            RET_K => return insn.k,
            other => panic!("unexpected opcode {other:#x}"),
        };
        assert!(pc < f.len(), "jumped past the end");
    }
}

const X86_64: u32 = AUDIT_ARCH_X86_64;

fn nr(name: &str) -> u32 {
    syscalls::number(name).unwrap()
}

fn rule(names: &[&str], action: &str, errno: Option<u32>, args: Vec<SeccompArg>) -> SeccompSyscall {
    SeccompSyscall {
        names: names.iter().map(|s| s.to_string()).collect(),
        action: action.into(),
        errno_ret: errno,
        args,
    }
}

fn arg(index: u32, value: u64, value_two: u64, op: &str) -> SeccompArg {
    SeccompArg {
        index,
        value,
        value_two,
        op: op.into(),
    }
}

fn profile(default: &str, syscalls: Vec<SeccompSyscall>) -> SeccompProfile {
    SeccompProfile {
        default_action: default.into(),
        default_errno_ret: None,
        architectures: vec!["SCMP_ARCH_X86_64".into()],
        flags: vec![],
        syscalls,
    }
}

#[test]
fn deny_one_call_allow_the_rest() {
    let p = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["mkdir", "mkdirat"],
            "SCMP_ACT_ERRNO",
            Some(1),
            vec![],
        )],
    );
    let prog = SeccompProgram::compile(&p).unwrap();
    assert_eq!(run(&prog, X86_64, nr("mkdir"), [0; 6]), RET_ERRNO | 1);
    assert_eq!(run(&prog, X86_64, nr("mkdirat"), [0; 6]), RET_ERRNO | 1);
    assert_eq!(run(&prog, X86_64, nr("read"), [0; 6]), RET_ALLOW);
    assert_eq!(run(&prog, X86_64, nr("openat"), [0; 6]), RET_ALLOW);
    // Other ABIs are killed: i386, and x32 numbers on x86_64.
    assert_eq!(run(&prog, 0x4000_0003, 39, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(
        run(&prog, X86_64, 0x4000_0000 | nr("mkdir"), [0; 6]),
        RET_KILL_PROCESS
    );
}

#[test]
fn actions_and_default_errno() {
    let p = SeccompProfile {
        default_errno_ret: Some(38),
        ..profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(&["read"], "SCMP_ACT_ALLOW", None, vec![]),
                rule(&["write"], "SCMP_ACT_ERRNO", None, vec![]),
                rule(&["kill"], "SCMP_ACT_KILL", None, vec![]),
                rule(&["tkill"], "SCMP_ACT_KILL_PROCESS", None, vec![]),
                rule(&["tgkill"], "SCMP_ACT_TRAP", None, vec![]),
                rule(&["getpid"], "SCMP_ACT_LOG", None, vec![]),
                rule(&["ptrace"], "SCMP_ACT_TRACE", Some(3), vec![]),
            ],
        )
    };
    let prog = SeccompProgram::compile(&p).unwrap();
    let r = |name| run(&prog, X86_64, nr(name), [0; 6]);
    assert_eq!(r("read"), RET_ALLOW);
    assert_eq!(r("write"), RET_ERRNO | libc::EPERM as u32);
    assert_eq!(r("kill"), RET_KILL_THREAD);
    assert_eq!(r("tkill"), RET_KILL_PROCESS);
    assert_eq!(r("tgkill"), RET_TRAP);
    assert_eq!(r("getpid"), RET_LOG);
    assert_eq!(r("ptrace"), RET_TRACE | 3);
    assert_eq!(r("mkdir"), RET_ERRNO | 38);
}

/// Every operator against Rust's meaning, on values that differ in the high word, the low
/// word, both, or not at all.
#[test]
fn argument_operators_compare_64_bits() {
    let values: [u64; 9] = [
        0,
        1,
        0xffff_ffff,
        0x1_0000_0000,
        0x1_0000_0001,
        0x2_ffff_fffe,
        u64::MAX - 1,
        u64::MAX,
        0x7fff_0000_8000_0000,
    ];
    type Meaning = fn(u64, u64) -> bool;
    let ops: [(&str, Meaning); 6] = [
        ("SCMP_CMP_EQ", |x, v| x == v),
        ("SCMP_CMP_NE", |x, v| x != v),
        ("SCMP_CMP_LT", |x, v| x < v),
        ("SCMP_CMP_LE", |x, v| x <= v),
        ("SCMP_CMP_GT", |x, v| x > v),
        ("SCMP_CMP_GE", |x, v| x >= v),
    ];
    for (op, meaning) in ops {
        for &v in &values {
            let p = profile(
                "SCMP_ACT_ALLOW",
                vec![rule(
                    &["ioctl"],
                    "SCMP_ACT_ERRNO",
                    Some(1),
                    vec![arg(2, v, 0, op)],
                )],
            );
            let prog = SeccompProgram::compile(&p).unwrap();
            for &x in &values {
                let mut args = [0; 6];
                args[2] = x;
                let want = if meaning(x, v) {
                    RET_ERRNO | 1
                } else {
                    RET_ALLOW
                };
                assert_eq!(
                    run(&prog, X86_64, nr("ioctl"), args),
                    want,
                    "{x:#x} {op} {v:#x}"
                );
            }
        }
    }
    // MASKED_EQ: (x & value) == valueTwo.
    for &mask in &values {
        for &want in &values {
            let p = profile(
                "SCMP_ACT_ALLOW",
                vec![rule(
                    &["ioctl"],
                    "SCMP_ACT_ERRNO",
                    Some(1),
                    vec![arg(5, mask, want, "SCMP_CMP_MASKED_EQ")],
                )],
            );
            let prog = SeccompProgram::compile(&p).unwrap();
            for &x in &values {
                let mut args = [0; 6];
                args[5] = x;
                let expect = if x & mask == want {
                    RET_ERRNO | 1
                } else {
                    RET_ALLOW
                };
                assert_eq!(run(&prog, X86_64, nr("ioctl"), args), expect);
            }
        }
    }
}

/// Several rules for one call: all conditions of a rule must hold, rules are tried in order,
/// and a call matching none gets the default (also after an unconditional earlier rule for
/// another call).
#[test]
fn conditions_combine_and_rules_fall_back_to_default() {
    let p = profile(
        "SCMP_ACT_ERRNO",
        vec![
            rule(&["write"], "SCMP_ACT_ALLOW", None, vec![]),
            rule(
                &["personality"],
                "SCMP_ACT_ALLOW",
                None,
                vec![arg(0, 0, 0, "SCMP_CMP_EQ")],
            ),
            rule(
                &["personality"],
                "SCMP_ACT_LOG",
                None,
                vec![arg(0, 8, 0, "SCMP_CMP_GE"), arg(0, 16, 0, "SCMP_CMP_LT")],
            ),
            rule(&["read"], "SCMP_ACT_ALLOW", None, vec![]),
        ],
    );
    let prog = SeccompProgram::compile(&p).unwrap();
    let pers = |x: u64| run(&prog, X86_64, nr("personality"), [x, 0, 0, 0, 0, 0]);
    assert_eq!(pers(0), RET_ALLOW);
    assert_eq!(pers(8), RET_LOG);
    assert_eq!(pers(15), RET_LOG);
    assert_eq!(pers(16), RET_ERRNO | 1);
    assert_eq!(pers(3), RET_ERRNO | 1);
    assert_eq!(run(&prog, X86_64, nr("read"), [9; 6]), RET_ALLOW);
    assert_eq!(run(&prog, X86_64, nr("write"), [9; 6]), RET_ALLOW);
}

#[test]
fn unknown_names_are_skipped_and_foreign_arches_ignored() {
    let p = SeccompProfile {
        architectures: vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()],
        ..profile(
            "SCMP_ACT_ALLOW",
            vec![rule(
                &["no_such_call", "mkdir", "arm_fadvise64_64"],
                "SCMP_ACT_ERRNO",
                Some(1),
                vec![],
            )],
        )
    };
    let prog = SeccompProgram::compile(&p).unwrap();
    assert_eq!(prog.unknown_names, ["no_such_call", "arm_fadvise64_64"]);
    assert_eq!(prog.warnings.len(), 1);
    assert!(
        prog.warnings[0].contains("SCMP_ARCH_X86"),
        "{:?}",
        prog.warnings
    );
    assert_eq!(run(&prog, X86_64, nr("mkdir"), [0; 6]), RET_ERRNO | 1);
}

#[test]
fn malformed_profiles_are_refused_with_their_name() {
    let bad_op = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["ioctl"],
            "SCMP_ACT_ERRNO",
            None,
            vec![arg(0, 1, 0, "SCMP_CMP_SORTA")],
        )],
    );
    let e = SeccompProgram::compile(&bad_op).err().unwrap();
    assert_eq!(
        e.to_string(),
        "linux.seccomp.syscalls[0]: unknown operator `SCMP_CMP_SORTA`"
    );
    let bad_index = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["ioctl"],
            "SCMP_ACT_ERRNO",
            None,
            vec![arg(6, 1, 0, "SCMP_CMP_EQ")],
        )],
    );
    assert_eq!(
        SeccompProgram::compile(&bad_index).err(),
        Some(SeccompError::BadArgIndex { rule: 0, index: 6 })
    );
    let bad_action = profile("SCMP_ACT_MAYBE", vec![]);
    assert_eq!(
        SeccompProgram::compile(&bad_action).err(),
        Some(SeccompError::UnknownAction("SCMP_ACT_MAYBE".into()))
    );
    let notify = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&["read"], "SCMP_ACT_NOTIFY", None, vec![])],
    );
    assert_eq!(
        SeccompProgram::compile(&notify).err(),
        Some(SeccompError::NotifyUnsupported)
    );
    let bad_errno = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&["read"], "SCMP_ACT_ERRNO", Some(70000), vec![])],
    );
    assert_eq!(
        SeccompProgram::compile(&bad_errno).err(),
        Some(SeccompError::BadErrno(70000))
    );
    let bad_flag = SeccompProfile {
        flags: vec!["SECCOMP_FILTER_FLAG_NONE".into()],
        ..profile("SCMP_ACT_ALLOW", vec![])
    };
    assert!(matches!(
        SeccompProgram::compile(&bad_flag),
        Err(SeccompError::UnknownFlag(_))
    ));
    // A bad operator in a rule dropped for having the default action is still an error.
    let hidden = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["ioctl"],
            "SCMP_ACT_ALLOW",
            None,
            vec![arg(0, 1, 0, "SCMP_CMP_X")],
        )],
    );
    assert!(SeccompProgram::compile(&hidden).is_err());
}

#[test]
fn sizes_are_bounded() {
    let names: Vec<String> = (0..=MAX_SECCOMP_NAMES).map(|i| format!("x{i}")).collect();
    let too_many = profile(
        "SCMP_ACT_ALLOW",
        vec![SeccompSyscall {
            names,
            action: "SCMP_ACT_ERRNO".into(),
            ..Default::default()
        }],
    );
    let e = SeccompProgram::compile(&too_many).err().unwrap();
    assert!(matches!(e, SeccompError::TooLarge(_)), "{e}");
    let too_many_rules = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&["read"], "SCMP_ACT_LOG", None, vec![]); MAX_SECCOMP_RULES + 1],
    );
    assert!(matches!(
        SeccompProgram::compile(&too_many_rules),
        Err(SeccompError::TooLarge(_))
    ));
    let long_name = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&[&"a".repeat(65)], "SCMP_ACT_LOG", None, vec![])],
    );
    assert!(matches!(
        SeccompProgram::compile(&long_name),
        Err(SeccompError::TooLarge(_))
    ));
    let too_many_args = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["read"],
            "SCMP_ACT_LOG",
            None,
            vec![arg(0, 0, 0, "SCMP_CMP_EQ"); 7],
        )],
    );
    assert!(matches!(
        SeccompProgram::compile(&too_many_args),
        Err(SeccompError::TooLarge(_))
    ));
    // Within the entry limits but over the kernel's 4096 instructions: 700 rules of 6
    // conditions each on real calls.
    let heavy = profile(
        "SCMP_ACT_ALLOW",
        (0..700)
            .map(|i| {
                let name = syscalls::X86_64_SYSCALLS[i % syscalls::X86_64_SYSCALLS.len()].0;
                rule(
                    &[name],
                    "SCMP_ACT_LOG",
                    None,
                    vec![arg(0, 1, 0, "SCMP_CMP_GT"); 6],
                )
            })
            .collect(),
    );
    let e = SeccompProgram::compile(&heavy).err().unwrap();
    assert!(e.to_string().contains("4096 instructions"), "{e}");
}

/// An allow-list in the shape of podman's default profile (every known call allowed, default
/// ERRNO(ENOSYS)) fits comfortably.
#[test]
fn allow_list_of_every_call_fits() {
    let names: Vec<&str> = syscalls::X86_64_SYSCALLS.iter().map(|(n, _)| *n).collect();
    let p = SeccompProfile {
        default_errno_ret: Some(38),
        ..profile(
            "SCMP_ACT_ERRNO",
            vec![rule(&names, "SCMP_ACT_ALLOW", None, vec![])],
        )
    };
    let prog = SeccompProgram::compile(&p).unwrap();
    assert!(
        prog.instructions() < 3 * names.len() + 10,
        "{}",
        prog.instructions()
    );
    for (name, _) in syscalls::X86_64_SYSCALLS {
        assert_eq!(run(&prog, X86_64, nr(name), [0; 6]), RET_ALLOW, "{name}");
    }
    assert_eq!(run(&prog, X86_64, 1000, [0; 6]), RET_ERRNO | 38);
}
