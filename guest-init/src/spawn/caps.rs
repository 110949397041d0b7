//! `process.capabilities` -> capability masks ([`CapsPlan`]), and applying them in the child.
//!
//! Follows runc: the bounding set is cut first (`PR_CAPBSET_DROP` for every capability not
//! listed), `PR_SET_KEEPCAPS` keeps the permitted set across the switch to a non-root uid, then
//! `capset` (version 3) sets effective, permitted and inheritable, and the ambient set is raised
//! (`PR_CAP_AMBIENT_RAISE`). An unknown name is an error naming it; a name this kernel does not
//! have (number above `/proc/sys/kernel/cap_last_cap`) is skipped with a warning, as runc does.
//! The child side ([`CapsPlan::drop_bounding`], [`CapsPlan::apply`]) only issues system calls.

use kiln_protocol::Capabilities;

use super::plan::PlanError;

/// Capability names in number order (`CAP_CHOWN` = 0 .. `CAP_CHECKPOINT_RESTORE` = 40).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The number of capability `name` (`CAP_` prefix optional, any case), if known.
pub fn number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    NAMES.iter().position(|n| *n == full).map(|i| i as u32)
}

/// The highest capability number of the running kernel (`/proc/sys/kernel/cap_last_cap`), or
/// the highest this table knows when that file cannot be read.
pub fn kernel_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
        .min(63)
}

/// Capability sets as 64-bit masks, plus what the kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsPlan {
    /// Bounding set to keep.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
    /// `cap_last_cap` of the running kernel.
    pub last_cap: u32,
}

impl CapsPlan {
    /// Parses `caps` for a kernel whose highest capability is `last_cap`. Returns the plan and
    /// warnings for names the kernel does not have.
    pub fn new(caps: &Capabilities, last_cap: u32) -> Result<(Self, Vec<String>), PlanError> {
        let mut warnings = Vec::new();
        let mut mask = |set: &'static str, names: &[String]| -> Result<u64, PlanError> {
            let mut m = 0u64;
            for name in names {
                let n = number(name).ok_or_else(|| {
                    PlanError::Invalid(format!(
                        "unknown capability `{name}` in process.capabilities.{set}"
                    ))
                })?;
                if n > last_cap {
                    let w = format!("capability {name} not known to this kernel, skipped");
                    if !warnings.contains(&w) {
                        warnings.push(w);
                    }
                    continue;
                }
                m |= 1 << n;
            }
            Ok(m)
        };
        let plan = CapsPlan {
            bounding: mask("bounding", &caps.bounding)?,
            effective: mask("effective", &caps.effective)?,
            permitted: mask("permitted", &caps.permitted)?,
            inheritable: mask("inheritable", &caps.inheritable)?,
            ambient: mask("ambient", &caps.ambient)?,
            last_cap,
        };
        Ok((plan, warnings))
    }

    /// Child side: drops every capability not in the bounding set (needs `CAP_SETPCAP`).
    /// Returns the capability number and errno of a failure.
    pub fn drop_bounding(&self) -> Result<(), (u32, i32)> {
        for cap in 0..=self.last_cap {
            if self.bounding & (1 << cap) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc < 0 {
                return Err((cap, errno()));
            }
        }
        Ok(())
    }

    /// Child side: `PR_SET_KEEPCAPS` so the permitted set survives `setresuid` to non-root.
    pub fn keep_caps(on: bool) -> Result<(), i32> {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) };
        if rc < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    /// Child side, after the uid/gid switch: effective, permitted, inheritable (`capset` v3),
    /// then the ambient set. Returns (step, errno) of a failure: 0 capset, 1 ambient clear,
    /// 2 + n raising ambient capability n.
    pub fn apply(&self) -> Result<(), (u32, i32)> {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let half = |m: u64, i: u32| (m >> (32 * i)) as u32;
        let data = [0, 1].map(|i| Data {
            effective: half(self.effective, i),
            permitted: half(self.permitted, i),
            inheritable: half(self.inheritable, i),
        });
        // SAFETY: capset reads a v3 header and two data structs from our stack.
        let rc =
            unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
        if rc < 0 {
            return Err((0, errno()));
        }
        // SAFETY: prctl with integer arguments.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if rc < 0 {
            return Err((1, errno()));
        }
        for cap in 0..=self.last_cap {
            if self.ambient & (1 << cap) == 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if rc < 0 {
                return Err((2 + cap, errno()));
            }
        }
        Ok(())
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_become_masks_unknown_is_an_error_newer_is_skipped() {
        assert_eq!(number("CAP_CHOWN"), Some(0));
        assert_eq!(number("net_raw"), Some(13));
        assert_eq!(number("CAP_CHECKPOINT_RESTORE"), Some(40));
        let caps = Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_KILL", "CAP_BPF"]),
            effective: names(&["CAP_CHOWN"]),
            permitted: names(&["CAP_CHOWN", "CAP_KILL"]),
            inheritable: vec![],
            ambient: names(&["CAP_KILL"]),
        };
        // A kernel whose last capability is CAP_AUDIT_READ (37) lacks CAP_BPF (39).
        let (plan, warnings) = CapsPlan::new(&caps, 37).unwrap();
        assert_eq!(plan.bounding, 1 | 1 << 5);
        assert_eq!(plan.effective, 1);
        assert_eq!(plan.permitted, 1 | 1 << 5);
        assert_eq!(plan.ambient, 1 << 5);
        assert_eq!(
            warnings,
            ["capability CAP_BPF not known to this kernel, skipped"]
        );
        let (plan, warnings) = CapsPlan::new(&caps, 40).unwrap();
        assert_eq!(plan.bounding, 1 | 1 << 5 | 1 << 39);
        assert!(warnings.is_empty());
        let bad = Capabilities {
            effective: names(&["CAP_TELEPORT"]),
            ..Default::default()
        };
        let e = CapsPlan::new(&bad, 40).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown capability `CAP_TELEPORT` in process.capabilities.effective"
        );
    }
}
