//! `kiln create`: pack the disk, start the shim (which boots the VM and creates the process
//! without starting it), write the pid file. Everything is removed again if any step fails.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Child;
use std::time::Instant;

use super::{write_pid_file, CommandError, Context};
use crate::bundle::{Bundle, VmSize, ANNOTATION_VMM};
use crate::cgroups::{resolve_path, CgroupError, HostCgroup, Limits};
use crate::cli::CreateArgs;
use crate::config::VmmChoice;
use crate::image::pack_rootfs;
use crate::shim::ShimRequest;
use crate::state::{validate_id, ContainerState, Status};

/// Runs `create`; exit code 0 once the container is created.
pub fn run(ctx: &Context, args: &CreateArgs) -> Result<i32, CommandError> {
    let child = create(ctx, args, false)?;
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, child.id())?;
    }
    Ok(0)
}

/// Creates the container and returns the shim (a child of this process until we exit).
/// `own_terminal`: a terminal process without `--console-socket` uses our stdin/stdout
/// (`kiln run -t` from a shell).
pub fn create(ctx: &Context, args: &CreateArgs, own_terminal: bool) -> Result<Child, CommandError> {
    let started = Instant::now();
    validate_id(&args.id)?;
    if args.preserve_fds > 0 {
        return Err(CommandError::Unsupported(
            "--preserve-fds is not supported: host fds cannot be passed into a VM".into(),
        ));
    }
    let bundle = Bundle::load(&args.bundle)?;
    let (spec, binds) = bundle.container_spec_and_binds()?;
    if spec.process.terminal && args.console_socket.is_none() && !own_terminal {
        return Err(CommandError::Usage(
            "cannot allocate tty if kiln will detach without setting console socket".into(),
        ));
    }
    if !spec.process.terminal && args.console_socket.is_some() {
        return Err(CommandError::Usage(
            "cannot use console socket if kiln will not detach or allocate tty".into(),
        ));
    }
    let cfg = ctx.config()?;
    let size = bundle.vm_size(VmSize {
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
    })?;
    let annotations: BTreeMap<String, String> = bundle.annotations();
    let vmm = ctx
        .global
        .vmm
        .clone()
        .or_else(|| annotations.get(ANNOTATION_VMM).cloned());
    let vmm = match vmm {
        Some(v) => {
            v.parse::<VmmChoice>()?;
            v
        }
        None => vmm_name(cfg.vmm).to_string(),
    };

    let dir = ctx.store.create_dir(&args.id)?;
    let lock = ctx.store.lock(&args.id);
    let result = lock.map_err(CommandError::from).and_then(|_lock| {
        let state = ContainerState {
            id: args.id.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            created: crate::logging::rfc3339(std::time::SystemTime::now(), true),
            status: Status::Creating,
            shim_pid: None,
            shim_start: None,
            vmm_pid: None,
            guest_pid: None,
            vsock_uds: None,
            backend: None,
            exit_code: None,
            annotations,
            terminal: spec.process.terminal,
        };
        ctx.store.save(&state)?;
        let disk = dir.join("rootfs.ext4");
        let packed = pack_rootfs(&cfg, &bundle.rootfs, &disk)?;
        log::info!(
            "timing {}: image {} ms ({})",
            args.id,
            packed.elapsed.as_millis(),
            if packed.cache_hit { "cache hit" } else { "built" }
        );
        let mut drives = Vec::with_capacity(binds.len());
        for bind in &binds {
            let packed = crate::image::pack_bind(&cfg, bind, &dir)?;
            log::info!(
                "timing {}: bind {} on {} packed in {} ms ({}, {} bytes of files)",
                args.id,
                bind.source.display(),
                bind.destination,
                packed.elapsed.as_millis(),
                if packed.cache_hit { "cache hit" } else { "built" },
                packed.content_bytes
            );
            drives.push(packed.drive);
        }
        let request = ShimRequest {
            spec: spec.clone(),
            disk,
            drives,
            memory_mib: size.memory_mib,
            vcpus: size.vcpus,
            vmm: vmm.clone(),
            console_socket: args.console_socket.clone(),
            own_terminal,
        };
        let path = dir.join("shim.json");
        let json = serde_json::to_vec(&request).map_err(|e| {
            CommandError::io(&path, "serialise", std::io::Error::other(e.to_string()))
        })?;
        std::fs::write(&path, json).map_err(|e| CommandError::io(&path, "write", e))?;
        host_cgroup(&bundle, &args.id, size, &dir)?;
        let shim_started = Instant::now();
        let mut child = ctx.spawn_helper(&["shim", "--id", &args.id])?;
        let state = ctx.store.load(&args.id)?;
        let hooks = crate::hooks::run(
            &bundle.spec,
            crate::hooks::Stage::CreateRuntime,
            &state.oci_state(),
        )
        .and_then(|()| match &state.vsock_uds {
            Some(uds) => crate::hooks::run_in_guest(
                &bundle.spec,
                crate::hooks::GuestStage::CreateContainer,
                &state.oci_state(),
                uds,
                &args.id,
            ),
            None => Ok(()),
        });
        if let Err(e) = hooks {
            super::delete::kill_processes(&state);
            let _ = child.wait();
            return Err(e.into());
        }
        log::info!(
            "timing {}: shim ready (VM booted, agent up, process created) {} ms, create total {} ms",
            args.id,
            shim_started.elapsed().as_millis(),
            started.elapsed().as_millis()
        );
        Ok(child)
    });
    if result.is_err() {
        if let Ok(state) = ctx.store.load(&args.id) {
            super::delete::kill_processes(&state);
        }
        if let Some(cg) = HostCgroup::load(&dir) {
            cg.kill_leftovers();
            cg.remove();
        }
        let _ = ctx.store.remove(&args.id);
    }
    result
}

/// Creates the container's host cgroup (`linux.cgroupsPath`, else `/kiln/ID-HASH`, HASH from
/// the state directory), writes the host
/// limits and records it in `dir` for the shim (which joins it before it spawns the VMM) and
/// `delete`. A failure is an error when the spec names the path, unless the cgroupfs refuses
/// for permissions (rootless, read-only); then, and without a path, only a warning.
fn host_cgroup(bundle: &Bundle, id: &str, size: VmSize, dir: &Path) -> Result<(), CommandError> {
    let named = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned());
    let wrap =
        |e: CgroupError| CommandError::Cgroup(format!("{}/config.json", bundle.dir.display()), e);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let default_name = format!("{id}-{:08x}", h.finish() as u32);
    let path = resolve_path(named.as_deref(), &default_name).map_err(wrap)?;
    let limits = Limits::from_spec(&bundle.spec, size.memory_mib);
    let started = Instant::now();
    let cg = match HostCgroup::setup(&path, &limits) {
        Ok(cg) => cg,
        // Like runc rootless: a cgroupfs we may not write is no reason to fail.
        Err(e) if named.is_none() || e.is_permission_denied() => {
            log::warn!(
                "container {id}: no host cgroup: {}",
                kiln_protocol::error_chain(&e)
            );
            return Ok(());
        }
        Err(e) => return Err(wrap(e)),
    };
    if let Err(e) = cg.save(dir) {
        cg.remove();
        return Err(wrap(e));
    }
    log::info!(
        "timing {id}: host cgroup {path} set up in {} us ({} hierarchies, {:?})",
        started.elapsed().as_micros(),
        cg.dirs.len(),
        cg.limits
    );
    Ok(())
}

/// The config name of a VMM choice.
pub fn vmm_name(choice: VmmChoice) -> &'static str {
    match choice {
        VmmChoice::Auto => "auto",
        VmmChoice::HostVmm => "host-vmm",
        VmmChoice::Qemu => "qemu",
        VmmChoice::QemuKvm => "qemu-kvm",
        VmmChoice::QemuTcg => "qemu-tcg",
    }
}
