"""The examples/ scripts in a CI-sized form: each one run as its README says, on small settings."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_budget_sweep_example(reference_gguf_path, tmp_path):
    sweep = load_example("examples/memory_budget/sweep.py")
    assert sweep.main(["--model", str(reference_gguf_path), "--budgets", "160MB,50MB,320MB", "-n", "4",
                       "--input-len", "8-16", "--output-len", "3-6", "--max-num-seqs", "4", "--threads", "1",
                       "--out-dir", str(tmp_path)]) == 0
    runs = {r["memory_budget"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["runs"]}
    assert "too small" in runs["50MB"]["error"]
    mid, big = runs["160MB"], runs["320MB"]
    assert mid["completed"] == big["completed"] == 4 and 0 < mid["kv_blocks"] < big["kv_blocks"]
    assert all(1 <= r["max_running"] <= 4 and r["output_throughput"] > 0 for r in (mid, big))
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "| max running sequences |" in (tmp_path / "sweep.md").read_text()
