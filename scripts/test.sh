#!/usr/bin/env bash
# The whole test suite: set-up, formatting and lints, then every test of the workspace
# (unit tests, KVM tests with bare-metal test guests, Linux guests under QEMU TCG).
# Fails when /dev/kvm exists but any KVM test was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

export KILN_SKIP_LOG="$PWD/target/kvm-skipped.log"
rm -f "$KILN_SKIP_LOG"

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "[test] cargo test"
cargo test --workspace --release --no-fail-fast -- --test-threads=2

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
