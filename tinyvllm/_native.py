"""Loads the native core (libtinyvllm) with cffi in ABI mode, declarations read from tinyvllm.h.

ABI mode needs no compiler at import time and one library serves every Python version."""
import os
import re
import sys
from pathlib import Path

import cffi

_PKG = Path(__file__).resolve().parent
_LIB_NAME = {"darwin": "libtinyvllm.dylib", "win32": "tinyvllm.dll"}.get(sys.platform, "libtinyvllm.so")


class NativeError(RuntimeError):
    """A call into the native core failed; the message is the core's own."""


def _candidates(name: str, *extra: Path) -> list[Path]:
    # Installed wheel: next to this file. Source checkout: build dirs of the repo.
    here = [_PKG / name, *extra]
    if (_PKG.parent / "pyproject.toml").is_file():
        builds = [b for b in sorted(_PKG.parent.glob("build*")) if "asan" not in b.name]  # ASan libs need LD_PRELOAD
        # newest first: a stale copy in another build folder must not shadow a fresh build
        here += sorted((p for b in builds for p in b.rglob(name)), key=lambda p: -p.stat().st_mtime)
    return here


def _find(name: str, env: str, *extra: Path) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    for path in _candidates(name, *extra):
        if path.is_file():
            return path
    raise ImportError(
        f"tinyvllm: native file {name} not found at {_PKG / name} (nor in a build*/ folder of the "
        f"source tree; set {env} to its path). Reinstall with `pip install .` to build it.")


def _cdef_source(header: str) -> str:
    # cffi's cdef does not run the preprocessor: drop the C++ guard blocks and '#' lines.
    header = re.sub(r"#ifdef __cplusplus.*?#endif", "", header, flags=re.S)
    header = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    return "\n".join(line for line in header.splitlines() if not line.lstrip().startswith("#"))


ffi = cffi.FFI()
ffi.cdef(_cdef_source(_find("tinyvllm.h", "TINYVLLM_HEADER", _PKG.parent / "native/include/tinyvllm.h").read_text()))


def _open_library():
    """The first candidate that loads: a source tree may also hold cross builds (another CPU) or
    sanitizer builds (need LD_PRELOAD), which fail to open and are skipped."""
    if os.environ.get("TINYVLLM_LIB"):
        return Path(os.environ["TINYVLLM_LIB"]), ffi.dlopen(os.environ["TINYVLLM_LIB"])
    errors = []
    for path in (p for p in _candidates(_LIB_NAME) if p.is_file()):
        try:
            return path, ffi.dlopen(str(path))
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise ImportError(f"tinyvllm: native library {_LIB_NAME} not found or not loadable at {_PKG / _LIB_NAME} "
                      f"(nor in a build*/ folder of the source tree; set TINYVLLM_LIB to its path). Reinstall "
                      f"with `pip install .` to build it." + "".join("\n  " + e for e in errors))


LIB_PATH, lib = _open_library()


def check(rc: int) -> int:
    """Raise NativeError with the core's message when rc is an error code."""
    if rc < 0:
        raise NativeError(ffi.string(lib.tv_last_error()).decode("utf-8", "replace") or f"native error {rc}")
    return rc


def ptr(array, ctype: str = "float *"):
    """A cffi pointer into a C-contiguous numpy array (the array must outlive the call)."""
    assert array.flags["C_CONTIGUOUS"], "native calls need C-contiguous arrays"
    return ffi.cast(ctype, array.ctypes.data)
