//! kiln runtime library: the runc-compatible runtime behind the `kiln` binary.
//!
//! - [`cli`]: the command line (runc's flags and subcommands).
//! - [`commands`]: one module per subcommand.
//! - [`state`]: container state under `--root`, locks, liveness.
//! - [`bundle`]: OCI bundles to the agent's `ContainerSpec` and a VM size.
//! - [`image`]: the container's disk (rootfs-builder, cached).
//! - [`cgroups`]: the host cgroup of the VM processes (`linux.cgroupsPath`, host limits).
//! - [`sandbox`]: the VM of one container (backend choice, launch, agent connection, kill).
//! - [`shim`]: the per-container shim and the exec shim (stdio relay, exit codes).
//! - [`console`]: host ptys and `--console-socket`.
//! - [`hooks`]: OCI hooks that run on the host.
//! - [`config`], [`logging`], [`signals`]: runtime config, runc-style logs, signal names.
//! - [`vm`]: launching agent microVMs (host-vmm or QEMU microvm), shared with tests and benchmarks.

pub mod bundle;
pub mod cgroups;
pub mod cli;
pub mod commands;
pub mod config;
pub mod console;
pub mod hooks;
pub mod image;
pub mod logging;
pub mod sandbox;
pub mod shim;
pub mod signals;
pub mod state;
pub mod vm;
