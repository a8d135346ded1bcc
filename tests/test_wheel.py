"""The wheel: `pip wheel .` builds one `py3-none-<platform>` wheel (cffi ABI mode: the native core is a
plain shared library, so one wheel serves every Python), the wheel alone carries what the package needs
(library and header), and an unpacked copy of it generates the same greedy tokens as the tree under test."""
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from tinyvllm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("tinyvllm-*.whl")
    return whl


def test_wheel_is_py3_none_platform_and_self_contained(wheel):
    _, _, _, tags = parse_wheel_filename(wheel.name)
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert {(t.interpreter, t.abi, t.platform) for t in tags} == {("py3", "none", platform)}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    lib = {"darwin": "libtinyvllm.dylib", "win32": "tinyvllm.dll"}.get(sys.platform, "libtinyvllm.so")
    assert {f"tinyvllm/{lib}", "tinyvllm/tinyvllm.h", "tinyvllm/__init__.py", "tinyvllm/server/metrics.py"} <= names
    assert "Root-Is-Purelib: false" in meta and f"Tag: py3-none-{platform}" in meta


def test_unpacked_wheel_generates_like_the_tree(wheel, tmp_path, reference_gguf_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # the child sees the unpacked wheel first (dependencies still come from this venv), runs outside the
    # checkout, and is told nothing about where the library is: it must use the wheel's own
    env = {k: v for k, v in os.environ.items() if k not in ("TINYVLLM_LIB", "TINYVLLM_HEADER", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    code = ("import json, sys, tinyvllm; from tinyvllm import LLM, SamplingParams, _native\n"
            "llm = LLM(sys.argv[1], threads=1, max_model_len=128)\n"
            "out = llm.generate([sys.argv[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))\n"
            "print(json.dumps({'pkg': tinyvllm.__file__, 'lib': str(_native.LIB_PATH),"
            " 'tokens': list(out[0].outputs[0].token_ids)}))")
    r = subprocess.run([sys.executable, "-c", code, str(reference_gguf_path), PROMPT], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["pkg"]).resolve().is_relative_to(site.resolve())
    assert Path(got["lib"]).resolve().is_relative_to(site.resolve())
    want = LLM(str(reference_gguf_path), threads=1, max_model_len=128).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert got["tokens"] == list(want)


@pytest.mark.requires_feature("auditwheel", covers="the Linux wheel's manylinux compatibility (auditwheel show)",
                              programs=("auditwheel",))
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="auditwheel checks Linux wheels only")
def test_auditwheel_finds_a_manylinux_tag(wheel):
    r = subprocess.run(["auditwheel", "show", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert f'consistent with the following platform tag: "manylinux_' in text, text


def _auditwheel_tag(whl: Path) -> str:
    r = subprocess.run(["auditwheel", "show", str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r'consistent with the following platform tag: "([^"]+)"', " ".join(r.stdout.split()))
    assert m, r.stdout
    return m.group(1)


@pytest.mark.requires_feature("aarch64 cross wheel", covers="the aarch64 wheel cross-built with cross/aarch64-linux-gnu.cmake "
                              "and retagged manylinux by auditwheel (run on arm64 by cross/prove-arm64-wheel.sh)",
                              programs=("aarch64-linux-gnu-g++", "auditwheel", "patchelf"))
@pytest.mark.skipif(platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
                    reason="cross-builds from an x86-64 Linux host")
def test_cross_built_aarch64_wheel_gets_the_manylinux_tag_its_symbols_allow(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    env = {**os.environ, "_PYTHON_HOST_PLATFORM": "linux-aarch64"}  # the platform tag scikit-build-core writes
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(raw),
                        f"--config-settings=cmake.define.CMAKE_TOOLCHAIN_FILE={ROOT / 'cross' / 'aarch64-linux-gnu.cmake'}"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = raw.glob("tinyvllm-*-py3-none-linux_aarch64.whl")
    with zipfile.ZipFile(whl) as z:
        elf = z.read("tinyvllm/libtinyvllm.so")[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    shown = _auditwheel_tag(whl)
    assert re.fullmatch(r"manylinux_2_\d+_aarch64", shown), shown
    r = subprocess.run(["auditwheel", "repair", "--plat", "auto", "-w", str(out), str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (fixed,) = out.glob("*.whl")
    _, _, _, tags = parse_wheel_filename(fixed.name)
    assert {(t.interpreter, t.abi, t.platform) for t in tags} == {("py3", "none", shown)}
    with zipfile.ZipFile(fixed) as z:  # nothing grafted: the same files, no tinyvllm.libs/
        assert not any(n.startswith("tinyvllm.libs/") for n in z.namelist())
