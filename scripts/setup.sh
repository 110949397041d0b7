#!/usr/bin/env bash
# Installs everything kiln needs on a Debian 12 machine (run as root) and builds it:
# Debian packages, Rust targets, the guest kernel (cached by config hash outside the repo),
# the workspace in release mode and the static guest-init. Idempotent; a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

PKGS=(linux-source-6.1 flex bison bc libelf-dev libssl-dev build-essential e2fsprogs erofs-utils
      busybox-static qemu-system-x86 musl-tools cpio zstd xz-utils file podman runc crun
      containerd debootstrap)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for t in x86_64-unknown-none x86_64-unknown-linux-musl; do
  rustup target list --installed | grep -qx "$t" || { log "adding Rust target $t"; rustup target add "$t"; }
done

log "guest kernel"
KILN_KERNEL=$(kernel-config/build.sh --print-path)
export KILN_KERNEL
log "kernel: $KILN_KERNEL"

# vhost-device-vsock (rust-vmm) gives QEMU the same hybrid unix-socket vsock as host-vmm: the
# QEMU backend and the Linux end-to-end tests under QEMU TCG need it.
if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  log "installing vhost-device-vsock (cargo install, a few minutes)"
  cargo install --locked --quiet vhost-device-vsock@0.3.0
fi

log "building the workspace (release)"
cargo build --release --workspace --quiet
log "building guest-init (static musl)"
cargo build --release --quiet --target x86_64-unknown-linux-musl -p kiln-guest-init
