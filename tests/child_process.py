"""Every Python subprocess a test starts runs the tinyvllm package and native library this pytest process
imported, not whatever the checkout or the newest build*/ folder holds: one run, one binary.

child_env() passes the parent's resolved package root (PYTHONPATH, first) and library (TINYVLLM_LIB)
down; python_cmd()/tinyvllm_cmd() put that root before the child's cwd on sys.path (`python -c` would
import a checkout in the cwd before an installed package) and check that the child really loaded both,
so a child that drifted to another copy fails loudly instead of testing something else."""
import os
import sys
from pathlib import Path

import tinyvllm
from tinyvllm import _native

PKG_DIR = str(Path(tinyvllm.__file__).resolve().parent)
LIB = str(Path(_native.LIB_PATH).resolve())

_CHECK = """\
import os as _os, sys as _sys
_sys.path.insert(0, _os.path.dirname(_os.environ["TINYVLLM_TEST_PKG"]))  # before '' (the cwd, e.g. a checkout)
import tinyvllm as _tv, tinyvllm._native as _tvn
_pkg, _lib = _os.path.dirname(_os.path.realpath(_tv.__file__)), _os.path.realpath(_tvn.LIB_PATH)
if _pkg != _os.environ["TINYVLLM_TEST_PKG"] or _lib != _os.environ["TINYVLLM_TEST_LIB"]:
    raise SystemExit(f"test child loaded {_pkg} with {_lib}, but the tests run "
                     f"{_os.environ['TINYVLLM_TEST_PKG']} with {_os.environ['TINYVLLM_TEST_LIB']}")
del _os, _sys, _tv, _tvn, _pkg, _lib
"""


def child_env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(Path(PKG_DIR).parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TINYVLLM_LIB": LIB, "TINYVLLM_TEST_PKG": PKG_DIR,
            "TINYVLLM_TEST_LIB": LIB, **extra}


def python_cmd(code: str, *args: str) -> list[str]:
    """argv running `code` (after the package/library check) with sys.argv[1:] == args."""
    return [sys.executable, "-c", _CHECK + code, *map(str, args)]


def tinyvllm_cmd(*args: str) -> list[str]:
    """argv of `python -m tinyvllm ARGS`, checked first."""
    return python_cmd("import runpy\nrunpy.run_module('tinyvllm', run_name='__main__', alter_sys=True)\n", *args)
