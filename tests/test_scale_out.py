"""Scale-out on loopback (docs/SCALING.md): two `tinyvllm serve` processes behind a well-kept router run as
its own process (LiteLLM's proxy: the `litellm` program of `pip install 'litellm[proxy]'`; nginx with the
round-robin configuration of the docs), the real `openai` client talking only to the router, with its own
retries off so that any retry is the router's."""
import os
import re
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_process import start_server, stop_server, wait_until_up

SERVED = "smol"  # each backend's --served-model-name, and the proxy's public model name
PROMPTS = ["The story number 1 is", "My favourite colour is", "The answer to the question", "A good name for a cat"]
MAX_TOKENS = 6
PROXY_CONFIG = """\
model_list:
{deployments}
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 4
  allowed_fails: 0      # one failed call cools a deployment down ...
  cooldown_time: 600    # ... for the rest of the test
litellm_settings:
  request_timeout: 120
general_settings:
  master_key: {master_key}  # clients send it as their API key
"""
DEPLOYMENT = """\
  - model_name: {served}
    litellm_params:
      model: openai/{served}
      api_base: {url}/v1
      api_key: none
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_requests(url: str) -> int:
    """Requests this backend finished, from vLLM's metric name (what a vLLM-fleet router scrapes)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'^vllm:e2e_request_latency_seconds_count\{model_name="%s"\} (\S+)$' % SERVED, text, re.M)
    return int(float(m.group(1)))


def running(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=10).text
    return int(float(re.search(r'^vllm:num_requests_running\{model_name="%s"\} (\S+)$' % SERVED, text, re.M).group(1)))


NGINX_CONFIG = """\
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{}}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  upstream tinyvllm {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://tinyvllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"""


def start_proxy(config_path, log_path) -> tuple[subprocess.Popen, str]:
    """`litellm --config ...` on a free loopback port, its output to a file (a pipe nobody reads could fill)."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR")  # offline
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["litellm", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_until_up(proc, url + "/health/liveliness", "litellm", log_path.read_text, 180.0)
    return proc, url


def start_nginx(backend_urls, workdir) -> tuple[subprocess.Popen, str]:
    port = free_port()
    servers = "\n".join(f"    server {u.removeprefix('http://')} max_fails=1 fail_timeout=30s;" for u in backend_urls)
    config = workdir / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=workdir, servers=servers, port=port))
    log_path = workdir / "nginx.out"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["nginx", "-c", str(config), "-p", str(workdir)], stdout=log, stderr=subprocess.STDOUT)
    wait_until_up(proc, f"http://127.0.0.1:{port}/health", "nginx", log_path.read_text, 180.0)
    return proc, f"http://127.0.0.1:{port}"


def forty_requests_one_backend_killed(router_url: str, api_key: str, backends) -> None:
    """40 greedy chat requests through the router: the first 20 with both backends up (both serve some, and
    their vLLM-named metrics count exactly 20), the next 20 while backend A is killed with a request running
    on it. Every request completes, with the same greedy answer a backend gives directly."""
    (proc_a, url_a), (_, url_b) = backends
    direct = openai.OpenAI(base_url=url_b + "/v1", api_key="none", max_retries=0, timeout=120)
    client = openai.OpenAI(base_url=router_url + "/v1", api_key=api_key, max_retries=0, timeout=300)

    def ask(c, prompt):
        r = c.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": prompt}],
                                      max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    want = {p: ask(direct, p) for p in PROMPTS}
    base_a, base_b = served_requests(url_a), served_requests(url_b)

    with ThreadPoolExecutor(8) as pool:  # phase 1: both up
        first = list(pool.map(lambda i: ask(client, PROMPTS[i % 4]), range(20)))
    assert first == [want[PROMPTS[i % 4]] for i in range(20)]
    got_a, got_b = served_requests(url_a) - base_a, served_requests(url_b) - base_b
    assert got_a > 0 and got_b > 0 and got_a + got_b == 20, (got_a, got_b)

    with ThreadPoolExecutor(8) as pool:  # phase 2: A dies with work on it
        futures = [pool.submit(ask, client, PROMPTS[i % 4]) for i in range(20, 40)]
        deadline = time.monotonic() + 120
        while running(url_a) == 0:
            assert time.monotonic() < deadline and not all(f.done() for f in futures), \
                "no request reached backend A in phase 2"
            time.sleep(0.01)
        proc_a.kill()
        proc_a.wait()
        second = [f.result() for f in futures]
    assert second == [want[PROMPTS[i % 4]] for i in range(20, 40)]
    assert served_requests(url_b) - base_b > got_b  # B took over phase 2's work


def start_backends(model, n=2):
    common = ("--served-model-name", SERVED, "--threads", "1", "--max-num-seqs", "4", "--max-model-len", "256")
    return [start_server(model, *common) for _ in range(n)]


@pytest.mark.requires_feature("litellm-proxy", covers="N tinyvllm servers behind LiteLLM's proxy, with failover",
                              programs=("litellm",))
def test_two_backends_behind_litellm_proxy_survive_a_kill(reference_gguf_path, tmp_path):
    backends, proxy = start_backends(reference_gguf_path), None
    try:
        config = tmp_path / "litellm.yaml"
        master_key = "sk-" + secrets.token_hex(16)
        config.write_text(PROXY_CONFIG.format(master_key=master_key,
                                              deployments="".join(DEPLOYMENT.format(served=SERVED, url=u)
                                                                  for _, u in backends)))
        proxy, proxy_url = start_proxy(config, tmp_path / "litellm.log")
        forty_requests_one_backend_killed(proxy_url, master_key, backends)
    finally:
        for proc in [proxy] + [p for p, _ in backends]:
            if proc is not None:
                stop_server(proc)


@pytest.mark.requires_feature("nginx", covers="N tinyvllm servers behind nginx round-robin (docs/SCALING.md's config)",
                              programs=("nginx",))
def test_two_backends_behind_nginx_survive_a_kill(reference_gguf_path, tmp_path):
    backends, proxy = start_backends(reference_gguf_path), None
    try:
        proxy, url = start_nginx([u for _, u in backends], tmp_path)
        forty_requests_one_backend_killed(url, "none", backends)
    finally:
        if proxy is not None:  # SIGTERM: the master stops its workers (SIGKILL would orphan them)
            proxy.terminate()
            proxy.wait(30)
        for proc, _ in backends:
            stop_server(proc)
