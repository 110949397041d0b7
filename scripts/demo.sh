#!/usr/bin/env bash
# kiln's main job, from a fresh Debian 12 machine (as root):
#   1. set up and build everything (packages, guest kernel, host-vmm, guest-init, tools);
#   2. host-vmm boots a microVM on KVM (the bare-metal test guest, console visible) and reports
#      its boot timings;
#   3. a Linux microVM (our kernel, guest-init as PID 1, a busybox image built by rootfs-builder)
#      runs a command through the `kiln` OCI runtime and prints its output and timings.
# Usage: scripts/demo.sh [COMMAND...]   (default: a short shell script)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

scripts/setup.sh

ms() { date +%s%N; }
elapsed() { echo "$(( ($(ms) - $1) / 1000000 )) ms"; }
say() { printf '\n==> %s\n' "$*"; }

WORK=$ROOT/target/demo
rm -rf "$WORK"; mkdir -p "$WORK"
REL=$ROOT/target/release
KERNEL=$(kernel-config/build.sh --print-path)
GUEST_INIT=$ROOT/target/x86_64-unknown-linux-musl/release/guest-init

say "host-vmm boots the bare-metal test guest (serial console below)"
cargo build --quiet --release --target x86_64-unknown-none \
  --manifest-path tests/guests/Cargo.toml --target-dir "$ROOT/target/guests"
GUEST=$ROOT/target/guests/x86_64-unknown-none/release/guest-pvh
t0=$(ms)
RUST_LOG=info "$REL/host-vmm" --kernel "$GUEST" --mem-mib 128 --vcpus 2 \
  --cmdline "kiln.test=bootinfo" 2>"$WORK/host-vmm.log"
echo "host-vmm: guest started, printed and reset in $(elapsed "$t0") (process start to exit)"
grep -h 'boot-timer' "$WORK/host-vmm.log" || true

say "rootfs-builder packs a busybox container image with guest-init"
mkdir -p "$WORK/busybox/bin" "$WORK/busybox/etc"
cp /bin/busybox "$WORK/busybox/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$WORK/busybox/bin/$a"; done
echo "root:x:0:0:root:/root:/bin/sh" > "$WORK/busybox/etc/passwd"
if [ $# -eq 0 ]; then
  set -- /bin/sh -c 'echo "hello from a kiln microVM: $(uname -sr), $(nproc) vCPU, pid $$"; echo "hostname: $(hostname)"; exit 0'
fi
t0=$(ms)
"$REL/rootfs-builder" bundle --image "$WORK/busybox" --out "$WORK/bundle" \
  --guest-init "$GUEST_INIT" -- "$@" >/dev/null
echo "bundle with a block image built in $(elapsed "$t0")"
python3 - "$WORK/bundle/config.json" "$@" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
spec = json.load(open(path))
spec["process"]["args"] = args
spec["process"]["terminal"] = False
spec["hostname"] = "kiln-demo"
json.dump(spec, open(path, "w"), indent=2)
PY

say "kiln runs the command in a Linux microVM"
if [ -e /sys/module/kvm_pvm ]; then
  echo "note: this host's KVM is PVM: host-vmm runs Linux userspace here only with the PVM kernel flavour, 30-60 s per boot; kiln uses its QEMU (TCG) backend"
fi
t0=$(ms)
set +e
KILN_KERNEL=$KERNEL KILN_GUEST_INIT=$GUEST_INIT KILN_HOST_VMM=$REL/host-vmm \
  "$REL/kiln" --root "$WORK/state" --log "$WORK/kiln.log" --debug \
  run --bundle "$WORK/bundle" "demo-$$"
status=$?
set -e
echo "exit status $status; kiln run took $(elapsed "$t0") end to end (image from cache, VM boot, agent, command, teardown)"
grep -hiE 'timing|ready|backend' "$WORK/kiln.log" | sed 's/^/  kiln: /' | head -20 || true
exit "$status"
