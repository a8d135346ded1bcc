"""Engine arguments, declared once for every command (`generate`, `chat`, `serve`, `bench`) and named
as vLLM names them. Importing this module stays light: no native core, no numpy."""
import argparse
from dataclasses import asdict, dataclass, fields

from . import __version__
from .model.fetch import DEFAULT_MODEL


@dataclass
class EngineArgs:
    """LLMEngine's keyword arguments with their command-line defaults (tests check that they equal
    LLMEngine's own defaults, so `tinyvllm generate` and `LLM()` start the same engine)."""
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    device: str = "cpu"
    threads: int | None = None
    quantization: str | None = None
    memory_budget: str | None = None
    kv_cache_memory_bytes: str | None = None
    kv_cache_dtype: str = "float16"
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    long_prefill_token_threshold: int = 0
    decode_stall_ratio: float = 3.0
    enable_prefix_caching: bool = True
    seed: int = 0
    speculative_config: str | None = None
    enable_structured_outputs: bool | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = EngineArgs()
        g = parser.add_argument_group("engine arguments (shared by generate, chat, perplexity, serve and bench)")
        g.add_argument("--model", "-m", default=d.model, help="alias, GGUF file, HF directory or HF repo id")
        g.add_argument("--tokenizer", default=d.tokenizer,
                       help="HF directory with tokenizer.json (default: the model's own tokenizer)")
        g.add_argument("--device", default=d.device,
                       help="cpu (native core) or tinygrad[:DEV] (pip install tinyvllm[gpu])")
        g.add_argument("--threads", "-t", type=int, default=d.threads, help="CPU threads (default: physical cores)")
        g.add_argument("--quantization", "-q", default=d.quantization,
                       help="quantize a float checkpoint at load: int8 (Q8_0) or int4 (Q4_0); GGUF weights stay "
                            "as stored (default: none)")
        g.add_argument("--memory-budget", default=d.memory_budget,
                       help="total bytes for weights + KV cache + workspace, e.g. 512MB; the KV pool gets what "
                            "is left (bench: a comma list such as 128MB,256MB sweeps it) (default: no budget)")
        g.add_argument("--kv-cache-memory-bytes", default=d.kv_cache_memory_bytes,
                       help="KV pool size, e.g. 64MB, instead of what --memory-budget leaves "
                            "(default: enough for --max-num-seqs full-length sequences, at most 256 MiB)")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                       help="element type of the KV cache: float16 or float32 (the runners check it)")
        g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
        g.add_argument("--max-model-len", type=int, default=d.max_model_len,
                       help="context length per sequence, prompt + output (default: the model's, bounded by "
                            "the KV pool)")
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences in one batch at most")
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                       help="tokens in one step at most (longer prompts are prefilled in chunks)")
        g.add_argument("--long-prefill-token-threshold", type=int, default=d.long_prefill_token_threshold,
                       help="tokens of one prompt prefilled per step at most (0: no cap of its own)")
        g.add_argument("--decode-stall-ratio", type=float, default=d.decode_stall_ratio,
                       help="while sequences decode, prefill chunks are sized so that a step takes about this "
                            "many decode-only steps at most (0: prefills fill --max-num-batched-tokens)")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching, help="reuse the KV blocks of prompts that share a prefix")
        g.add_argument("--seed", type=int, default=d.seed,
                       help="seed of the random draws of requests without a seed of their own "
                            "(bench: also of the workload and the arrivals)")
        g.add_argument("--speculative-config", default=d.speculative_config,
                       help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                            '"prompt_lookup_max": 4}\' or \'{"method": "draft_model", "model": "<path>", '
                            '"num_speculative_tokens": 3}\' (optional keys: prompt_lookup_min, disable_by_batch_size, '
                            'min_acceptance_rate, draft_quantization) (default: off)')
        g.add_argument("--enable-structured-outputs", action=argparse.BooleanOptionalAction,
                       default=d.enable_structured_outputs,
                       help="constrained outputs (JSON schema, regex, tools). Default: on when llguidance is installed "
                            "and there is no --memory-budget; under a budget only when given, and then the budget "
                            "reserves llguidance's tokenizer")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def engine_kwargs(self) -> dict:
        """Keyword arguments of LLMEngine / LLM (the model goes positionally)."""
        kwargs = asdict(self)
        del kwargs["model"]
        kwargs["kv_cache_bytes"] = kwargs.pop("kv_cache_memory_bytes")
        return kwargs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each argument's default after its help, except where there is nothing to show (None, a
    flag that is off) or the help already says what happens by default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", "-V", action="version", version=f"tinyvllm {__version__}")
