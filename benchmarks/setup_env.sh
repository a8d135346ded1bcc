#!/usr/bin/env bash
# Creates the benchmark environment .venv-bench/ at the repo root (gitignored by `.venv*/`).
#
# It holds what the benchmarks compare against and must never become a dependency of the
# package: tinyvllm itself (`pip install .`, which also builds the native core), llama-cpp-python
# (the llama.cpp reference, compiled from source for this CPU) and psutil (peak RSS).
#
# Usage (from anywhere):
#   bash benchmarks/setup_env.sh            # create or update .venv-bench/
#   .venv-bench/bin/python benchmarks/bench_engines.py          # tinyvllm vs llama.cpp
#   .venv-bench/bin/python benchmarks/bench_kernels.py          # kernel GB/s and GOP/s
#
# Compiling llama.cpp takes several minutes on 2 cores; pip's wheel cache makes re-runs fast.
# Environment: PYTHON (default python3), CMAKE_ARGS (default -DGGML_NATIVE=ON), LLAMA_CPP_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PY="${PYTHON:-python3}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install psutil
# --no-binary: a prebuilt wheel would be built for another CPU; we want this machine's llama.cpp.
"$VENV/bin/python" -m pip install --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION"
# Build in .venv-bench/ so this copy of libtinyvllm.so does not land in the repo's build*/ folders
# (the source-tree loader picks the newest library there).
"$VENV/bin/python" -m pip install "$ROOT" -C build-dir="$VENV/build-tinyvllm"

cd / && "$VENV/bin/python" - <<'PY'
import llama_cpp, psutil, tinyvllm, tinyvllm._native as n
print("llama-cpp-python", llama_cpp.__version__, "| psutil", psutil.__version__)
print("tinyvllm", tinyvllm.__file__, "| lib", n.LIB_PATH, "| kernels", n.ffi.string(n.lib.tv_kernel_path()).decode())
PY
echo "ok: $VENV"
