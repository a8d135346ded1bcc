"""Property-based API testing from the server's own OpenAPI schema (issue 16): Schemathesis' command line
against a live `build_app` server on loopback (uvicorn in a thread, a tiny model). Its coverage phase
(boundary values, missing/extra fields, wrong types, undeclared methods) and its fuzzing phase (a bounded
number of Hypothesis examples per operation) send requests generated from the schema; every response must
be a 2xx or a 4xx, never a 5xx or a hang, and conform to the schema (status codes, content types, JSON
bodies, each event of a stream), and a schema-violating request must be refused. The schema is held to what
the server does. One check is left out: `positive_data_acceptance` (every schema-valid request gets a 2xx)
cannot hold for limits that depend on the model (the context length, the vocabulary's id range).

Below it, regression tests for what Schemathesis found."""
import os
import re
import subprocess
import sys

import httpx
import pytest

from tiny_models import make_tiny_gguf
from tinyvllm import LLMEngine
from tinyvllm.server.api import build_app

from child_process import child_env
from test_server import LiveServer, idle

pytestmark = pytest.mark.requires_feature("schemathesis", covers="property-based API testing from the OpenAPI schema",
                                          modules=("schemathesis",), min_python=(3, 11))  # 4.32 needs 3.11

# Bounded for CI: fuzzing examples per operation (7 operations), on top of the coverage phase's cases.
EXAMPLES = int(os.environ.get("TINYVLLM_SCHEMATHESIS_EXAMPLES", "25"))
MAX_LEN, MAX_SEQS = 64, 4  # a small context keeps every generated max_tokens cheap
REQUEST_TIMEOUT_S = 60  # a hang fails the run instead of stalling it
OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "POST /tokenize",
              "POST /detokenize", "GET /health", "GET /metrics"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = LLMEngine(make_tiny_gguf(tmp_path_factory.mktemp("api") / "t.gguf"), threads=1, max_model_len=MAX_LEN,
                       max_num_seqs=MAX_SEQS)
    server = LiveServer(build_app(engine, "tiny"))
    yield server, server.server.config.app.state.async_llm, engine
    server.stop()


def test_schema_lists_every_route(live):
    paths = httpx.get(live[0].url + "/openapi.json").json()["paths"]
    assert {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops} == set(OPERATIONS)
    for p, ops in paths.items():  # FastAPI's 422 is never sent (validation errors are 400s)
        assert all("422" not in op["responses"] for op in ops.values()), p


def test_generated_requests_get_2xx_or_4xx_conforming_to_schema(live, tmp_path):
    server, aeng, engine = live
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--phases", "coverage,fuzzing",
           "--max-examples", str(EXAMPLES), "--seed", "16", "--request-timeout", str(REQUEST_TIMEOUT_S),
           "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=child_env(), cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and counts[1] == counts[2], out[-3000:]
    print(f"schemathesis: {counts[1]} generated requests, all passed ({EXAMPLES} fuzzing examples per operation)")
    assert int(counts[1]) >= len(OPERATIONS) * 2, out[-3000:]  # it really ran
    assert aeng.alive and aeng.wait_until(idle, timeout=120), aeng.stats  # nothing left running or held
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


# ---- found by Schemathesis ---------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": [[False]], "max_tokens": 1}),  # was token id 0
    ("/v1/completions", {"prompt": [True, 5], "max_tokens": 1}),
    ("/detokenize", {"tokens": [True]}),
    ("/tokenize", {"prompt": "Hi", "return_token_strs": 0}),  # was False
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "parallel_tool_calls": 0}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "2"}),
    ("/v1/completions", {"prompt": "Hi", "stream": "false"}),
])
def test_wrong_json_type_is_400_not_coerced(live, path, body):
    r = httpx.post(live[0].url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_float_field_still_takes_a_json_integer(live):  # strict mode must not refuse `"temperature": 0`
    r = httpx.post(live[0].url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0,
                                                         "top_p": 1}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path,allowed", [("TRACE", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET"),
                                                 ("PUT", "/health", "GET")])
def test_405_names_the_allowed_methods(live, method, path, allowed):
    r = httpx.request(method, live[0].url + path, timeout=60)
    assert r.status_code == 405 and r.headers.get("allow") == allowed, (r.headers, r.text)
    assert r.json()["error"]["message"] == "Method Not Allowed"
