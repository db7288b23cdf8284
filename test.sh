#!/usr/bin/env bash
# The project's tests: the Rust tests (`cargo test --profile release-checked --features cuda
# --tests`, then `--doc`: the release build's optimizations with debug assertions and
# overflow checks on; the CUDA feature needs no CUDA toolkit) and the Python package's tests
# (pytest python/tests) together. The Python side runs in python/.venv, made here on first
# use with maturin, pytest, torch, numpy and safetensors at the pins of
# python/requirements-test.txt (torch from PyPI is large: the first run downloads a few GB);
# the package is then built from python/ by maturin and installed into it, as
# `pip install ./python` would, but in the tests' profile and with the CUDA feature.
#
#   ./test.sh              everything
#   ./test.sh --python     only the Python side (venv, build, pytest)
#   ./test.sh --aarch64    only the Rust tests, cross-built for AArch64 (NEON kernels) and run
#                          under QEMU user emulation (Debian/Ubuntu, as root: installs qemu-user
#                          and the cross toolchain; docs/engineering.md, "AArch64")
#   PYTHON=python3.12 ./test.sh    the interpreter that makes the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "--aarch64" ]; then
    shift
    target=aarch64-unknown-linux-gnu
    sysroot=/usr/aarch64-linux-gnu
    if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
        || [ ! -d "$sysroot/lib" ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "test.sh --aarch64 needs qemu-aarch64, aarch64-linux-gnu-gcc and $sysroot" \
                "(Debian: apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)" >&2
            exit 1
        fi
        echo "== installing qemu-user and the AArch64 cross toolchain (apt-get)"
        apt-get update -qq
        apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
    fi
    rustup target add "$target"
    # The CLI tests start the dmkd binary itself, an AArch64 program: the kernel runs it
    # through QEMU once binfmt_misc knows the format (qemu-user ships the entry).
    skip=()
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        { [ -e /proc/sys/fs/binfmt_misc/register ] \
            || mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc; } 2>/dev/null || true
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        { [ -w /proc/sys/fs/binfmt_misc/register ] && [ -f "$conf" ] \
            && cat "$conf" > /proc/sys/fs/binfmt_misc/register; } 2>/dev/null || true
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        echo "== binfmt_misc has no qemu-aarch64 entry: the tests that start the binary are skipped"
        skip=(--skip cli:: --skip bad_inputs::cli:: --skip counters::bench_counters_need_the_cpu_backend)
    fi
    echo "== Rust tests for $target under QEMU (at ${SECONDS} s)"
    export QEMU_LD_PREFIX="$sysroot"
    # QEMU computes a vector's lanes one by one: no test may expect NEON to be faster.
    export DMKD_TEST_EMULATED=1
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
    cargo test --profile release-checked --features cuda --target "$target" --tests -- "${skip[@]}" "$@"
    echo "== test.sh --aarch64 passed in ${SECONDS} s"
    exit 0
fi

rust=1
if [ "${1:-}" = "--python" ]; then rust=0; shift; fi

venv=python/.venv
if [ ! -x "$venv/bin/python" ]; then
    echo "== making $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
echo "== Python test environment (python/requirements-test.txt)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
echo "== building and installing the dmkd Python package (maturin, release-checked, CUDA feature; at ${SECONDS} s)"
# maturin's build backend runs the `maturin` program: the venv's, on PATH. It builds in the
# Rust tests' profile and features (MATURIN_PEP517_ARGS; `pip install ./python` alone gives
# `release` without CUDA): the binding then runs with debug assertions and overflow checks
# like the Rust tests, its `backend="cuda"` is built and tested (without a device it must
# refuse cleanly), and the dependencies whose features match are built once for both
# (docs/engineering.md, "CI time on a slow CPU").
MATURIN_PEP517_ARGS="--profile release-checked --features cuda" PATH="$PWD/$venv/bin:$PATH" \
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation \
    --force-reinstall --no-deps ./python

if [ "$rust" = 1 ]; then
    echo "== Rust tests (at ${SECONDS} s)"
    # Every target that has tests (the library's, the binary's, tests/), then the doctests.
    # Not the examples: plain `cargo test` builds them too, about an eighth of the
    # test build's CPU time (three optimized binaries: 217 of 1682 s on an AMD EPYC
    # Zen 1), and they run no test; clippy --all-targets (.ci/run) still compiles them.
    # With the CUDA feature, which builds without a CUDA toolkit (cudarc loads the
    # driver, NVRTC and cuBLAS at run time): one build for the CPU tests and the
    # CUDA ones (tests/cuda_nvrtc.rs runs the kernel sources in a CPU simulator).
    # Without a usable device, each device-only test passes with a printed reason and
    # the backend lists leave CUDA out; with one, CUDA joins the conformance suite.
    cargo test --profile release-checked --features cuda --tests
    cargo test --profile release-checked --features cuda --doc
fi

echo "== Python tests (at ${SECONDS} s)"
# From the repository root, with the installed package (not python/ itself) on the path.
"$venv/bin/python" -m pytest -q python/tests "$@"
echo "== test.sh passed in ${SECONDS} s"
