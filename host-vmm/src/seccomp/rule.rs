//! The allow-list vocabulary: one [`Allowed`] entry per system call, with its reason and the
//! argument checks that must hold, turned into a seccompiler filter by [`super::compile`].
//!
//! Kept as plain data (not seccompiler types) so the tests can call every allowed syscall with
//! arguments that satisfy its checks, and check that `docs/seccomp.md` shows each list as it is.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// One check on one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgCheck {
    /// Argument `arg` (0-5), compared as 32 bits, equals `value`.
    Eq32 { arg: u8, value: u32 },
    /// Argument `arg` (0-5), compared as 64 bits, equals `value`.
    Eq64 { arg: u8, value: u64 },
    /// `argument & mask == value` on the full 64 bits (e.g. "no PROT_EXEC bit").
    Masked { arg: u8, mask: u64, value: u64 },
}

impl ArgCheck {
    /// The argument index.
    pub fn arg(self) -> u8 {
        match self {
            ArgCheck::Eq32 { arg, .. }
            | ArgCheck::Eq64 { arg, .. }
            | ArgCheck::Masked { arg, .. } => arg,
        }
    }

    /// A value of the argument that passes this check.
    pub fn sample(self) -> u64 {
        match self {
            ArgCheck::Eq32 { value, .. } => u64::from(value),
            ArgCheck::Eq64 { value, .. } | ArgCheck::Masked { value, .. } => value,
        }
    }

    fn condition(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        match self {
            ArgCheck::Eq32 { arg, value } => SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(value),
            ),
            ArgCheck::Eq64 { arg, value } => {
                SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
            }
            ArgCheck::Masked { arg, mask, value } => SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                value,
            ),
        }
    }
}

/// A system call a thread may make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// x86_64 syscall number.
    pub nr: i64,
    /// Why this thread needs it (one line, naming the code that makes the call).
    pub why: &'static str,
    /// Allowed when any one of these lists of checks all hold; empty: always allowed.
    pub any_of: Vec<Vec<ArgCheck>>,
}

impl Allowed {
    /// Allowed with any arguments.
    pub fn any(nr: i64, why: &'static str) -> Self {
        Self {
            nr,
            why,
            any_of: Vec::new(),
        }
    }

    /// Allowed only when one of `alternatives` holds.
    pub fn when(nr: i64, why: &'static str, alternatives: Vec<Vec<ArgCheck>>) -> Self {
        Self {
            nr,
            why,
            any_of: alternatives,
        }
    }

    /// The seccompiler rules (empty: match on the syscall number alone).
    pub(crate) fn rules(&self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        self.any_of
            .iter()
            .map(|checks| {
                let conds = checks
                    .iter()
                    .map(|c| c.condition())
                    .collect::<Result<Vec<_>, _>>()?;
                SeccompRule::new(conds)
            })
            .collect()
    }
}

/// `ioctl(fd, request, ...)` allowed for exactly these request numbers.
pub fn ioctl_requests(why: &'static str, requests: &[u64]) -> Allowed {
    Allowed::when(
        libc::SYS_ioctl,
        why,
        requests
            .iter()
            // The kernel's ioctl command is an `unsigned int`: compare the low 32 bits.
            .map(|&r| {
                vec![ArgCheck::Eq32 {
                    arg: 1,
                    value: r as u32,
                }]
            })
            .collect(),
    )
}

/// Allowed when argument `arg` equals one of `values` (32-bit compare: flags, ops, signals).
pub fn arg_in(nr: i64, why: &'static str, arg: u8, values: &[u64]) -> Allowed {
    Allowed::when(
        nr,
        why,
        values
            .iter()
            .map(|&v| {
                vec![ArgCheck::Eq32 {
                    arg,
                    value: v as u32,
                }]
            })
            .collect(),
    )
}
