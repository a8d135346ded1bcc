"""The examples/ scripts in a CI-sized form: each one run as its README says, on small settings."""
import importlib.util
import json
from pathlib import Path

import pytest

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


@pytest.mark.requires_feature("dora", covers="the robot_node example's dora-rs dataflow", programs=("dora",),
                               min_python=(3, 11))
def test_robot_node_dataflow(reference_gguf_path, tmp_path):
    """The dora-rs dataflow, headless: `dora run` starts the scripted commander, the tinyvllm planner and
    the recorder; every action must be valid against the schema, the stale commands cancelled (no
    action for them), the deadline command answered with the fallback, the others by the model."""
    import os
    import shutil
    import subprocess
    import sys

    import jsonschema
    dora = shutil.which("dora", path=str(Path(sys.executable).parent)) or shutil.which("dora")
    assert dora, "the dora CLI is missing: pip install dora-rs-cli (in the test extra)"
    flow = ROOT / "examples/robot_node"
    log = tmp_path / "robot.jsonl"
    env = {**os.environ, "ROBOT_MODEL": str(reference_gguf_path), "ROBOT_THREADS": "1", "ROBOT_LOG": str(log),
           "ROBOT_MEMORY_BUDGET": "256MB", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    try:
        run = subprocess.run([dora, "run", str(flow / "dataflow.yml")], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired as e:  # show how far the dataflow got
        got = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"the dataflow hung; log so far:\n{got}\noutput:\n{(e.stdout or b'')[-3000:]!r}") from e
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    schema = json.loads((flow / "schema.json").read_text())
    actions = {r["metadata"]["command_id"]: r for r in records if r["id"] == "action"}
    status = {s["command_id"]: s for s in (json.loads(r["text"]) for r in records if r["id"] == "status")}
    for record in actions.values():
        jsonschema.validate(json.loads(record["text"]), schema)
    assert set(status) == {"c1", "c2", "c3", "c4", "c5", "c6"}
    assert [status[c]["outcome"] for c in ("c2", "c3")] == ["cancelled", "cancelled"]
    assert "c2" not in actions and "c3" not in actions
    assert status["c5"]["outcome"] == "deadline" and actions["c5"]["metadata"]["source"] == "fallback"
    for c in ("c1", "c4", "c6"):
        assert status[c]["outcome"] == "done" and actions[c]["metadata"]["source"] == "model"
        assert json.loads(status[c]["text"]) == json.loads(actions[c]["text"])
        partials = [r["text"] for r in records if r["id"] == "partial" and r["metadata"]["command_id"] == c]
        assert len(partials) >= 2 and all(status[c]["text"].startswith(p) for p in partials)


def test_assistant_calculator_and_lookup():
    assistant = load_example("examples/assistant/assistant.py")
    assert assistant.calculate("2 * (3 + 4) - 10 / 4") == 11.5
    for bad in ("__import__('os').system('true')", "x + 1", "2 ** 1000"):
        try:
            assistant.calculate(bad)
            raise AssertionError(f"{bad!r} was evaluated")
        except ValueError:
            pass
    tools = assistant.Tools(ROOT / "examples/assistant/notes")
    assert "7:00" in tools("lookup", {"word": "Tomatoes"}) and "nothing" in tools("lookup", {"word": "zebra"})
    assert tools("calculator", {"expression": "1/0"}).startswith("error")


def test_assistant_scripted_turns(reference_gguf_path, tmp_path):
    """Three scripted turns with forced tool calls, under a memory budget: every call is one of the
    tools with arguments valid against its schema and the result the tool gives for them; each turn's
    prompt finds the whole previous turn's prompt in the prefix cache (all but a partial last block)."""
    import io

    import jsonschema
    assistant = load_example("examples/assistant/assistant.py")
    out, stats = io.StringIO(), tmp_path / "turns.json"
    assert assistant.main(["--model", str(reference_gguf_path), "--memory-budget", "256MB", "--threads", "1",
                           "--max-tokens", "24", "--tool-choice", "required", "--stats-json", str(stats)],
                          lines=["What is 12 * 34?", "When are the tomatoes watered?", "/reset", "Hello", "/quit",
                                 "never read"], out=out) == 0
    turns = json.loads(stats.read_text())
    assert len(turns) == 3, out.getvalue()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in assistant.TOOLS}
    tools = assistant.Tools(ROOT / "examples/assistant/notes")
    for turn in turns:
        assert turn["tool_calls"], out.getvalue()
        call = turn["tool_calls"][0]
        jsonschema.validate(call["arguments"], schemas[call["name"]])
        if call["name"] != "clock":
            assert call["result"] == tools(call["name"], call["arguments"])
        assert f"[tool {call['name']}(" in out.getvalue()
    block = 16
    assert turns[0]["cached_tokens"] < block  # a cold cache (at most the shared start of the prompt)
    assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"] - block  # the history, reused
    assert turns[1]["cached_tokens"] < turns[1]["prompt_tokens"]
    # after /reset only the system prompt with the tool descriptions is still shared with the cache
    assert 0 < turns[2]["cached_tokens"] < turns[2]["prompt_tokens"] < turns[0]["prompt_tokens"] + block
    assert "never read" not in out.getvalue()


def test_assistant_drops_oldest_turns_when_full(reference_gguf_path, tmp_path):
    """A conversation longer than the context the engine allows keeps going: the oldest exchanges are
    dropped, the system prompt stays (and is still served from the prefix cache)."""
    import io
    assistant = load_example("examples/assistant/assistant.py")
    out, stats = io.StringIO(), tmp_path / "turns.json"
    assert assistant.main(["--model", str(reference_gguf_path), "--threads", "1", "--max-tokens", "16",
                           "--tool-choice", "none", "--max-model-len", "112", "--stats-json", str(stats)],
                          lines=["Hi there, how are you today?", "Tell me about tomatoes.", "And basil?",
                                 "And mint?", "And parsley?"], out=out) == 0
    turns = json.loads(stats.read_text())
    assert len(turns) == 5, out.getvalue()
    assert all(t["prompt_tokens"] + 16 <= 112 for t in turns)
    shrunk = [i for i in range(1, 5) if turns[i]["prompt_tokens"] < turns[i - 1]["prompt_tokens"]]
    assert shrunk, turns  # some turn had to forget
    assert all(t["cached_tokens"] >= 16 for t in turns[1:])  # the system prompt's block, at least
