"""`tinyvllm serve`: arguments only at import time; fastapi/uvicorn load when the command runs."""
import argparse
import contextlib
import logging
import os
import signal
import sys

from .. import __version__
from ..engine_args import EngineArgs
from ..model.fetch import DEFAULT_MODEL


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("OpenAI-compatible HTTP server. Requests that leave temperature out sample at 1.0,\n"
                     "as in OpenAI's API (the command line's generate and chat default to greedy).")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM's `serve MODEL` takes it; the same as --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--api-key", default=os.environ.get("TINYVLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $TINYVLLM_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for a batch slot; more are refused with 429")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body accepted, in bytes; larger ones get 413 before they are read "
                        "(default: 8 MiB)")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt accepted, in characters, checked before tokenizing; longer ones get 400 "
                        "(default: 32 per token of max_model_len)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="of the server's own log and of uvicorn's")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)


def engine_args(a) -> EngineArgs:
    """The engine arguments; the model comes from MODEL or --model (both given: they must agree)."""
    if a.model_tag is not None and a.model not in (DEFAULT_MODEL, a.model_tag):
        raise ValueError(f"serve got two models: {a.model_tag!r} and --model {a.model!r}")
    args = EngineArgs.from_cli_args(a)
    args.model = a.model_tag or a.model
    return args


def startup_summary(engine) -> str:
    """One line saying what was loaded and what the KV pool holds, so a log shows what the server runs."""
    runner, blocks = engine.runner, engine.scheduler.blocks
    kv_bytes = runner.kv_cache_bytes
    return (f"model {engine.model_path} ({engine.weights.kind}, {engine.config.num_layers} layers), "
            f"threads {runner.threads}, kernel path {runner.kernel_path}, "
            f"KV cache {blocks.num_blocks} blocks x {blocks.block_size} tokens = {kv_bytes / 2**20:.1f} MiB "
            f"({kv_bytes} bytes), max_model_len {engine.max_model_len}, max_num_seqs {engine.scheduler.max_num_seqs}")


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

    args = engine_args(a)
    log = logging.getLogger("tinyvllm.server")
    if not log.handlers:  # uvicorn configures only its own loggers
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's look
        log.addHandler(handler)
    log.setLevel(a.log_level.upper())
    engine = LLMEngine(args.model, **args.engine_kwargs())
    log.info("tinyvllm %s: %s", __version__, startup_summary(engine))
    limits = {k: v for k, v in (("max_request_bytes", a.max_request_bytes), ("max_prompt_chars", a.max_prompt_chars))
              if v is not None}
    app = build_app(engine, a.served_model_name or args.model, api_key=a.api_key, max_waiting=a.max_waiting,
                    **limits)
    server = Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                   timeout_graceful_shutdown=a.shutdown_grace))
    server.run()
    app.state.async_llm.shutdown()  # already stopped unless the shutdown was forced (a second Ctrl-C)
    return 0 if server.started else 1
