#!/usr/bin/env bash
# The whole test suite: set-up, formatting and lints, then every test of the workspace
# (unit tests, KVM tests with bare-metal test guests, Linux guests under QEMU TCG).
# Fails when /dev/kvm exists but any KVM test was skipped.
#
# The `cargo test` step runs under `timeout` (KILN_TEST_TIMEOUT, default 70m, any duration
# `timeout` accepts): a hung test then fails the run with a clear message instead of eating
# the CI budget. The wall time of each phase is printed at the end, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."

KILN_TEST_TIMEOUT="${KILN_TEST_TIMEOUT:-70m}"

# Wall time per phase, printed on exit (also when a phase fails).
PHASES=()
phase_name=""
phase_start=$SECONDS
run_start=$SECONDS
phase() {
  if [ -n "$phase_name" ]; then
    PHASES+=("$(printf '%-8s %5ds' "$phase_name" $((SECONDS - phase_start)))")
  fi
  phase_name="$1"
  phase_start=$SECONDS
}
report_times() {
  phase ""
  echo "[test] wall time per phase:"
  for p in "${PHASES[@]}"; do
    echo "[test]   $p"
  done
  printf '[test]   %-8s %5ds\n' total $((SECONDS - run_start))
}
trap report_times EXIT

phase setup
scripts/setup.sh

export KILN_SKIP_LOG="$PWD/target/kvm-skipped.log"
rm -f "$KILN_SKIP_LOG"

phase fmt
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
phase clippy
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

phase tests
echo "[test] cargo test (limit $KILN_TEST_TIMEOUT, KILN_TEST_TIMEOUT overrides)"
# Without --foreground, timeout signals its whole process group on expiry: cargo, the test
# binaries and the VMs they started. -k: SIGKILL a minute after the SIGTERM.
rc=0
timeout -k 60 "$KILN_TEST_TIMEOUT" \
  cargo test --workspace --release --no-fail-fast -- --test-threads=2 || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "!!! cargo test did not finish within $KILN_TEST_TIMEOUT and was killed: a test hangs." >&2
  echo "!!! The last 'Running ...' line above names the test binary, and 'has been running" >&2
  echo "!!! for over 60 seconds' lines name the tests still running." >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "!!! cargo test failed (exit $rc)" >&2
  exit "$rc"
fi

if [ -s "$KILN_SKIP_LOG" ]; then
  echo "!!! KVM tests were skipped:" >&2
  cat "$KILN_SKIP_LOG" >&2
  if [ -e /dev/kvm ]; then
    echo "!!! /dev/kvm exists on this machine, so skipped KVM tests are a failure" >&2
    exit 1
  fi
  echo "!!! no /dev/kvm on this machine: the VM tests above did NOT run" >&2
fi
echo "[test] all tests passed"
