#!/usr/bin/env bash
# Cross tests on an x86-64 Linux host: cross-build the native core for aarch64 and run its test
# binary under qemu-user as a Cortex-A72 (no dotprod: must pick "neon") and a Cortex-A76 (must pick
# "neon_dotprod"), then run an x86 build as a Nehalem (no AVX: must pick "scalar"). The test binary
# prints "kernel path: <default> (available: <list>)" first and loops its kernel tests over every
# available path, so each run also compares those paths against scalar.
# Usage: bash cross/run-tests.sh     (exit status non-zero on any failure)
# Build dirs: build-aarch64/ and build-nehalem/, or $TV_CROSS_A64_DIR / $TV_CROSS_X86_DIR (for
# several checkouts or agents sharing one tree).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
JOBS=$(nproc 2>/dev/null || echo 2)
SYSROOT=/usr/aarch64-linux-gnu
A64_DIR=${TV_CROSS_A64_DIR:-build-aarch64}
X86_DIR=${TV_CROSS_X86_DIR:-build-nehalem}

if [ "$(uname -m)" != x86_64 ]; then
    echo "cross/run-tests.sh runs on an x86-64 host; on an ARM board build and run the tests natively (cross/README.md)" >&2
    exit 2
fi

# -- tools: install the Debian packages when we can, otherwise say what is missing
missing=()
for tool in aarch64-linux-gnu-g++ qemu-aarch64 qemu-x86_64; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing g++-aarch64-linux-gnu qemu-user (missing: ${missing[*]})"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu qemu-user >/dev/null
    else
        echo "missing: ${missing[*]}. Install them (Debian/Ubuntu, as root):" >&2
        echo "  apt-get install -y --no-install-recommends g++-aarch64-linux-gnu qemu-user" >&2
        exit 2
    fi
fi
for tool in cmake ninja; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (pip install cmake ninja, or apt-get install cmake ninja-build)" >&2; exit 2; }
done

failures=0
# build DIR TARGET...: quiet unless it fails (g++ 12 prints false -Wmaybe-uninitialized noise from its
# AVX-512 headers); a failed build ends the run.
build() {
    local dir=$1 t=$SECONDS
    shift
    if ! cmake --build "$dir" -j "$JOBS" --target "$@" >"$dir/build.log" 2>&1; then
        grep -E 'error|Error' -A3 "$dir/build.log" | head -60 >&2
        echo "FAIL: build of $dir (full log: $dir/build.log)" >&2
        exit 1
    fi
    echo "   built $* in $((SECONDS - t)) s"
}
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# run_check LABEL EXPECTED_PATH FORBIDDEN CMD...: runs the test binary, checks its exit status and
# the kernel path it chose; the paths in FORBIDDEN (space-separated) must not even be available.
run_check() {
    local label=$1 want=$2 forbid=$3 t=$SECONDS out rc=0
    shift 3
    echo "== $label"
    out=$("$@" 2>&1) || rc=$?
    local head
    head=$(printf '%s\n' "$out" | grep -m1 '^kernel path:' || true)
    printf '%s\n' "$out" | grep -E '^kernel path:|FAIL|tests, ' || true
    [ "$rc" = 0 ] || fail "$label: exit status $rc"
    [[ "$head" == "kernel path: $want "* ]] || fail "$label: expected kernel path '$want', got '${head:-nothing}'"
    local avail=${head#*available: } f
    for f in $forbid; do [[ ",${avail%)}," != *",$f,"* ]] || fail "$label: '$f' listed as available"; done
    echo "   ($((SECONDS - t)) s)"
}

# -- aarch64 cross build (the shared library too, so its link is checked)
echo "== cross-building for aarch64 into $A64_DIR/"
cmake -S . -B "$A64_DIR" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$PWD/cross/aarch64-linux-gnu.cmake" \
    -DCMAKE_BUILD_TYPE=Release -DTINYVLLM_BUILD_TESTS=ON >/dev/null
build "$A64_DIR" tinyvllm_native tinyvllm_tests

A64=$A64_DIR/native/tinyvllm_tests
run_check "aarch64 cortex-a72 (ARMv8.0, no dotprod)" neon neon_dotprod qemu-aarch64 -L $SYSROOT -cpu cortex-a72 $A64
# forcing dotprod on a CPU without it must fall back (to the best available), never SIGILL
run_check "aarch64 cortex-a72, TINYVLLM_KERNEL=neon_dotprod (falls back)" neon neon_dotprod \
    env TINYVLLM_KERNEL=neon_dotprod qemu-aarch64 -L $SYSROOT -cpu cortex-a72 $A64 kernel
run_check "aarch64 cortex-a76 (ARMv8.2 + dotprod)" neon_dotprod "" qemu-aarch64 -L $SYSROOT -cpu cortex-a76 $A64
run_check "aarch64 cortex-a76, TINYVLLM_KERNEL=neon" neon "" \
    env TINYVLLM_KERNEL=neon qemu-aarch64 -L $SYSROOT -cpu cortex-a76 $A64

# -- x86-64 without AVX: the AVX2/AVX-512 tables must be neither chosen nor exercised
echo "== building for x86-64 into $X86_DIR/"
cmake -S . -B "$X86_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTINYVLLM_BUILD_TESTS=ON >/dev/null
build "$X86_DIR" tinyvllm_tests
run_check "x86-64 Nehalem (SSE4.2, no AVX)" scalar "avx2 avx512vnni" qemu-x86_64 -cpu Nehalem "$X86_DIR"/native/tinyvllm_tests

echo "== cross tests: $failures failure(s), $((SECONDS - T0)) s total"
[ "$failures" = 0 ]
