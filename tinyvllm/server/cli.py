"""`tinyvllm serve MODEL`: arguments only at import time; fastapi/uvicorn load when the command runs."""
import argparse
import contextlib
import os
import signal
import sys

from ..model.fetch import DEFAULT_MODEL


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias, GGUF file, HF directory or HF repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--api-key", default=os.environ.get("TINYVLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $TINYVLLM_API_KEY)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--device", default="cpu", help="cpu (native core) or tinygrad[:DEV] (pip install tinyvllm[gpu])")
    p.add_argument("--memory-budget", default=None, help="total bytes for weights + KV + workspace, e.g. 512MB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences in one batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens in one step at most")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for a batch slot; more are refused with 429")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(a) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"tinyvllm serve: {e.name} is missing; install the server extra: pip install tinyvllm[server]",
              file=sys.stderr)
        return 1
    from ..engine import LLMEngine
    from .api import build_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown (exit status 128+n); a clean
            # shutdown on SIGINT/SIGTERM should exit 0, so only flag the exit here.
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    engine = LLMEngine(a.model, threads=a.threads, device=a.device, memory_budget=a.memory_budget,
                       max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens)
    app = build_app(engine, a.served_model_name or a.model, api_key=a.api_key, max_waiting=a.max_waiting)
    server = Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                   timeout_graceful_shutdown=a.shutdown_grace))
    server.run()
    app.state.async_llm.shutdown()  # already stopped unless the shutdown was forced (a second Ctrl-C)
    return 0 if server.started else 1
