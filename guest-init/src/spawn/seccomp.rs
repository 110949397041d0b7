//! OCI seccomp profile ([`SeccompProfile`], `linux.seccomp`) -> classic BPF program, and its
//! installation in the child right before `execve`.
//!
//! The profile comes from the host and is checked here like any untrusted input: sizes are
//! bounded (`MAX_SECCOMP_*` of the protocol, and the kernel's 4096 instructions), every action,
//! operator, flag and argument index is parsed, and an unknown one is an error naming it.
//! Syscall names the x86_64 table ([`super::syscalls`]) does not know are skipped, as libseccomp
//! skips names it cannot resolve; architectures other than x86_64 are ignored (the guest is
//! x86_64 only), and a process of another architecture (i386, x32 numbers) is killed.
//!
//! Program layout (evaluated top to bottom, first match wins, like libseccomp's priority for
//! rules in profile order):
//!
//! ```text
//!   ld arch;  jeq AUDIT_ARCH_X86_64 ? next : ret KILL_PROCESS
//!   ld nr;    jge 0x40000000 (x32) ? ret KILL_PROCESS : next
//!   for each syscall number with rules:   jeq nr ? body : skip body
//!     body: for each rule: argument checks (64-bit, two 32-bit halves) -> ret action
//!           ret default action
//!   ret default action
//! ```
//!
//! Rules whose action equals the default action are dropped (runc does the same); the scan is
//! linear in the number of distinct system calls, like libseccomp's default (podman's default
//! profile: about 1100 instructions, a few hundred executed per system call in the worst case).

use std::collections::BTreeMap;

use kiln_protocol::{
    SeccompArg, SeccompProfile, MAX_SECCOMP_ARGS, MAX_SECCOMP_NAMES, MAX_SECCOMP_NAME_LEN,
    MAX_SECCOMP_RULES,
};
use libc::sock_filter;

use super::syscalls;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's `BPF_MAXINSNS`.
pub const MAX_INSTRUCTIONS: usize = 4096;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

const FLAG_LOG: u32 = 1 << 1;
const FLAG_SPEC_ALLOW: u32 = 1 << 2;

// Offsets in `struct seccomp_data`: nr, arch, instruction pointer, args[6].
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Why a profile cannot be compiled (an `InvalidArgument` for the host).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    /// More entries, names or conditions than allowed, or a program over 4096 instructions.
    #[error("linux.seccomp is too large: {0}")]
    TooLarge(String),
    /// An action string that is not an OCI seccomp action.
    #[error("linux.seccomp: unknown action `{0}`")]
    UnknownAction(String),
    /// `SCMP_ACT_NOTIFY` needs a listener on the host, which a VM guest cannot reach.
    #[error("linux.seccomp: action SCMP_ACT_NOTIFY (seccomp user notification) is not supported")]
    NotifyUnsupported,
    /// An operator string that is not an OCI seccomp operator.
    #[error("linux.seccomp.syscalls[{rule}]: unknown operator `{op}`")]
    UnknownOperator {
        /// Index of the entry.
        rule: usize,
        /// The operator.
        op: String,
    },
    /// An argument index outside 0..=5.
    #[error("linux.seccomp.syscalls[{rule}]: argument index {index} outside 0..=5")]
    BadArgIndex {
        /// Index of the entry.
        rule: usize,
        /// The index.
        index: u32,
    },
    /// A flag that is not an OCI seccomp flag.
    #[error("linux.seccomp: unknown flag `{0}`")]
    UnknownFlag(String),
    /// An errno outside 0..=4095.
    #[error("linux.seccomp: errno {0} outside 0..=4095")]
    BadErrno(u32),
}

/// A compiled filter, ready for `seccomp(SECCOMP_SET_MODE_FILTER)` in the child.
pub struct SeccompProgram {
    filter: Vec<sock_filter>,
    flags: u32,
    /// Syscall names skipped because the x86_64 table does not know them (for a warning).
    pub unknown_names: Vec<String>,
    /// Other notes for the log (ignored architectures).
    pub warnings: Vec<String>,
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn parse_action(action: &str, errno: Option<u32>) -> Result<u32, SeccompError> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    if errno > 4095 {
        return Err(SeccompError::BadErrno(errno));
    }
    Ok(match action {
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        "SCMP_ACT_ERRNO" => RET_ERRNO | errno,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_LOG" => RET_LOG,
        // With no tracer attached the kernel fails the call with ENOSYS.
        "SCMP_ACT_TRACE" => RET_TRACE | errno,
        "SCMP_ACT_NOTIFY" => return Err(SeccompError::NotifyUnsupported),
        other => return Err(SeccompError::UnknownAction(other.to_string())),
    })
}

/// A jump target inside one rule's block: fall through, end of the current condition, or the
/// rule failed (next rule).
#[derive(Clone, Copy)]
enum Target {
    Next,
    CondEnd,
    Fail,
}

/// Appends the check of one 64-bit argument condition; on mismatch it jumps to `Fail`.
fn condition(
    rule: usize,
    arg: &SeccompArg,
    out: &mut Vec<(sock_filter, Target, Target)>,
) -> Result<(), SeccompError> {
    use Target::{CondEnd, Fail, Next};
    if arg.index > 5 {
        return Err(SeccompError::BadArgIndex {
            rule,
            index: arg.index,
        });
    }
    let lo_off = OFF_ARGS + 8 * arg.index;
    let hi_off = lo_off + 4;
    let hi = |v: u64| (v >> 32) as u32;
    let lo = |v: u64| v as u32;
    let v = arg.value;
    let ld = |off| (stmt(LD_ABS_W, off), Next, Next);
    let j = |code, k, t, f| (jump(code, k, 0, 0), t, f);
    let seq: Vec<(sock_filter, Target, Target)> = match arg.op.as_str() {
        "SCMP_CMP_EQ" => vec![
            ld(hi_off),
            j(JEQ_K, hi(v), Next, Fail),
            ld(lo_off),
            j(JEQ_K, lo(v), Next, Fail),
        ],
        "SCMP_CMP_NE" => vec![
            ld(hi_off),
            j(JEQ_K, hi(v), Next, CondEnd),
            ld(lo_off),
            j(JEQ_K, lo(v), Fail, Next),
        ],
        "SCMP_CMP_MASKED_EQ" => {
            let want = arg.value_two;
            vec![
                ld(hi_off),
                (stmt(AND_K, hi(v)), Next, Next),
                j(JEQ_K, hi(want), Next, Fail),
                ld(lo_off),
                (stmt(AND_K, lo(v)), Next, Next),
                j(JEQ_K, lo(want), Next, Fail),
            ]
        }
        // x > v: hi > v.hi, or hi == v.hi and lo > v.lo (unsigned, as libseccomp).
        "SCMP_CMP_GT" | "SCMP_CMP_GE" => {
            let last = if arg.op == "SCMP_CMP_GT" {
                JGT_K
            } else {
                JGE_K
            };
            vec![
                ld(hi_off),
                j(JGT_K, hi(v), CondEnd, Next),
                j(JEQ_K, hi(v), Next, Fail),
                ld(lo_off),
                j(last, lo(v), Next, Fail),
            ]
        }
        // x < v is !(x >= v); x <= v is !(x > v).
        "SCMP_CMP_LT" | "SCMP_CMP_LE" => {
            let last = if arg.op == "SCMP_CMP_LT" {
                JGE_K
            } else {
                JGT_K
            };
            vec![
                ld(hi_off),
                j(JGT_K, hi(v), Fail, Next),
                j(JEQ_K, hi(v), Next, CondEnd),
                ld(lo_off),
                j(last, lo(v), Fail, Next),
            ]
        }
        other => {
            return Err(SeccompError::UnknownOperator {
                rule,
                op: other.to_string(),
            })
        }
    };
    let len = seq.len();
    // Resolve CondEnd now (it is inside this condition); Fail later.
    for (i, (insn, t, f)) in seq.into_iter().enumerate() {
        let to_end = |t: Target| match t {
            CondEnd => (Next, (len - i - 1) as u8),
            other => (other, 0),
        };
        let (t, jt) = to_end(t);
        let (f, jf) = to_end(f);
        let mut insn = insn;
        insn.jt = jt;
        insn.jf = jf;
        out.push((insn, t, f));
    }
    Ok(())
}

/// One rule of a syscall number: conditions and the return value when they all hold.
struct Rule<'a> {
    index: usize,
    args: &'a [SeccompArg],
    ret: u32,
}

/// Emits one rule: its conditions, then `ret`; a failing condition jumps past the `ret`.
fn emit_rule(rule: &Rule<'_>, prog: &mut Vec<sock_filter>) -> Result<(), SeccompError> {
    let mut block = Vec::new();
    for arg in rule.args {
        condition(rule.index, arg, &mut block)?;
    }
    let len = block.len();
    for (i, (mut insn, t, f)) in block.into_iter().enumerate() {
        // Fail = the instruction after this rule's `ret`, i.e. `len - i` ahead.
        let resolve = |target: Target, off: u8| -> Result<u8, SeccompError> {
            match target {
                Target::Fail => u8::try_from(len - i)
                    .map_err(|_| SeccompError::TooLarge("argument conditions too long".into())),
                _ => Ok(off),
            }
        };
        insn.jt = resolve(t, insn.jt)?;
        insn.jf = resolve(f, insn.jf)?;
        prog.push(insn);
    }
    prog.push(stmt(RET_K, rule.ret));
    Ok(())
}

fn check_sizes(p: &SeccompProfile) -> Result<(), SeccompError> {
    if p.syscalls.len() > MAX_SECCOMP_RULES {
        return Err(SeccompError::TooLarge(format!(
            "{} syscalls entries, at most {MAX_SECCOMP_RULES}",
            p.syscalls.len()
        )));
    }
    let names: usize = p.syscalls.iter().map(|r| r.names.len()).sum();
    if names > MAX_SECCOMP_NAMES {
        return Err(SeccompError::TooLarge(format!(
            "{names} syscall names, at most {MAX_SECCOMP_NAMES}"
        )));
    }
    let strings = p
        .architectures
        .iter()
        .chain(&p.flags)
        .chain(p.syscalls.iter().flat_map(|r| r.names.iter()))
        .chain(p.syscalls.iter().map(|r| &r.action))
        .chain(p.syscalls.iter().flat_map(|r| r.args.iter().map(|a| &a.op)));
    for s in strings {
        if s.len() > MAX_SECCOMP_NAME_LEN {
            return Err(SeccompError::TooLarge(format!(
                "a name of {} bytes, at most {MAX_SECCOMP_NAME_LEN}",
                s.len()
            )));
        }
    }
    for (i, r) in p.syscalls.iter().enumerate() {
        if r.args.len() > MAX_SECCOMP_ARGS {
            return Err(SeccompError::TooLarge(format!(
                "syscalls[{i}] has {} args conditions, at most {MAX_SECCOMP_ARGS}",
                r.args.len()
            )));
        }
    }
    Ok(())
}

impl SeccompProgram {
    /// Checks and compiles `profile`.
    pub fn compile(profile: &SeccompProfile) -> Result<Self, SeccompError> {
        check_sizes(profile)?;
        let default = parse_action(&profile.default_action, profile.default_errno_ret)?;
        let mut flags = 0;
        for f in &profile.flags {
            flags |= match f.as_str() {
                "SECCOMP_FILTER_FLAG_LOG" => FLAG_LOG,
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => FLAG_SPEC_ALLOW,
                // One thread in the child: synchronising threads is moot.
                "SECCOMP_FILTER_FLAG_TSYNC" => 0,
                // Only meaningful with user notification, which is refused.
                "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV" => 0,
                other => return Err(SeccompError::UnknownFlag(other.to_string())),
            };
        }
        let mut warnings = Vec::new();
        let foreign: Vec<&str> = profile
            .architectures
            .iter()
            .map(String::as_str)
            .filter(|a| !matches!(*a, "SCMP_ARCH_X86_64" | "SCMP_ARCH_NATIVE"))
            .collect();
        if !foreign.is_empty() {
            warnings.push(format!(
                "seccomp architectures {} ignored: the guest runs x86_64 only (other ABIs are killed)",
                foreign.join(", ")
            ));
        }
        // Group rules by syscall number, in profile order.
        let mut by_nr: BTreeMap<u32, Vec<Rule<'_>>> = BTreeMap::new();
        let mut unknown_names = Vec::new();
        for (index, r) in profile.syscalls.iter().enumerate() {
            let ret = parse_action(&r.action, r.errno_ret)?;
            // Parse every condition even when the rule is dropped, so errors are never hidden.
            let mut scratch = Vec::new();
            for a in &r.args {
                condition(index, a, &mut scratch)?;
            }
            if ret == default {
                continue;
            }
            for name in &r.names {
                match syscalls::number(name) {
                    Some(nr) => by_nr.entry(nr).or_default().push(Rule {
                        index,
                        args: &r.args,
                        ret,
                    }),
                    None => {
                        if !unknown_names.contains(name) {
                            unknown_names.push(name.clone());
                        }
                    }
                }
            }
        }
        let mut prog = vec![
            stmt(LD_ABS_W, OFF_ARCH),
            jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_ABS_W, OFF_NR),
            jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
            stmt(RET_K, RET_KILL_PROCESS),
        ];
        let too_long = || {
            SeccompError::TooLarge(format!(
                "the compiled filter exceeds {MAX_INSTRUCTIONS} instructions"
            ))
        };
        for (nr, rules) in &by_nr {
            let mut body = Vec::new();
            for rule in rules {
                emit_rule(rule, &mut body)?;
            }
            // The last rule has conditions and may not match: the default for this call (the
            // accumulator no longer holds the number, so nothing may fall out of the body).
            if rules.last().is_some_and(|r| !r.args.is_empty()) {
                body.push(stmt(RET_K, default));
            }
            if prog.len() + body.len() + 2 > MAX_INSTRUCTIONS {
                return Err(too_long());
            }
            // jeq nr ? body : past body (the jump over it is a `ja`, whose offset is 32 bits).
            prog.push(jump(JEQ_K, *nr, 1, 0));
            prog.push(stmt(JA, body.len() as u32));
            prog.extend(body);
        }
        prog.push(stmt(RET_K, default));
        if prog.len() > MAX_INSTRUCTIONS {
            return Err(too_long());
        }
        Ok(SeccompProgram {
            filter: prog,
            flags,
            unknown_names,
            warnings,
        })
    }

    /// Number of BPF instructions.
    pub fn instructions(&self) -> usize {
        self.filter.len()
    }

    /// Installs the filter on the calling thread. Child side: no allocation, one system call.
    /// Needs `no_new_privs` or `CAP_SYS_ADMIN`. Returns the errno on failure.
    pub fn install(&self) -> Result<(), i32> {
        let prog = libc::sock_fprog {
            len: self.filter.len() as u16,
            filter: self.filter.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at the plan's instruction array, which outlives the call; the
        // kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
mod tests;
