"""The command line agrees with itself: one set of engine arguments (vLLM's names) on every subcommand,
`serve --model`, `--version`, defaults in the help. Parse-level: no model loads here."""
import inspect
import re
from pathlib import Path

import pytest

import tinyvllm
from tinyvllm import cli
from tinyvllm.engine import LLMEngine
from tinyvllm.engine_args import EngineArgs
from tinyvllm.model.fetch import DEFAULT_MODEL
from tinyvllm.server import cli as serve_cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["generate", "chat", "serve", "bench"]
# every engine flag with a value unlike its default, and what EngineArgs must then hold
FLAGS = ["--model", "m.gguf", "--tokenizer", "tok/", "--device", "tinygrad:CPU", "--threads", "3",
         "--quantization", "int8", "--memory-budget", "300MB", "--kv-cache-memory-bytes", "64MB",
         "--kv-cache-dtype", "float32", "--block-size", "32", "--max-model-len", "1024", "--max-num-seqs", "7",
         "--max-num-batched-tokens", "96", "--long-prefill-token-threshold", "48",
         "--decode-stall-ratio", "2.5", "--no-enable-prefix-caching", "--seed", "11",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}', "--no-enable-structured-outputs"]
EXPECTED = EngineArgs(model="m.gguf", tokenizer="tok/", device="tinygrad:CPU", threads=3, quantization="int8",
                      memory_budget="300MB", kv_cache_memory_bytes="64MB", kv_cache_dtype="float32", block_size=32,
                      max_model_len=1024, max_num_seqs=7, max_num_batched_tokens=96, long_prefill_token_threshold=48,
                      decode_stall_ratio=2.5, enable_prefix_caching=False,
                      seed=11, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}',
                      enable_structured_outputs=False)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def engine_args_of(a) -> EngineArgs:
    return serve_cli.engine_args(a) if a.command == "serve" else EngineArgs.from_cli_args(a)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_takes_every_engine_flag(command):
    assert engine_args_of(parse(command, *FLAGS)) == EXPECTED
    assert engine_args_of(parse(command)) == EngineArgs()  # and the same defaults everywhere
    short = engine_args_of(parse(command, "-m", "x.gguf", "-t", "2", "-q", "int4"))
    assert (short.model, short.threads, short.quantization) == ("x.gguf", 2, "int4")


def test_engine_args_defaults_and_names_are_llm_engines():
    """The command line starts the engine LLMEngine(model) starts, and every argument reaches it."""
    signature = inspect.signature(LLMEngine).parameters
    kwargs = EngineArgs().engine_kwargs()
    assert set(kwargs) <= set(signature) - {"model"}
    assert {k: signature[k].default for k in kwargs} == kwargs
    assert EngineArgs().model == DEFAULT_MODEL
    assert EXPECTED.engine_kwargs()["kv_cache_bytes"] == "64MB"


def test_serve_takes_the_model_positionally_or_as_model():
    assert serve_cli.engine_args(parse("serve", "--model", "a.gguf")).model == "a.gguf"
    assert serve_cli.engine_args(parse("serve", "a.gguf")).model == "a.gguf"
    assert serve_cli.engine_args(parse("serve", "a.gguf", "--model", "a.gguf")).model == "a.gguf"
    assert serve_cli.engine_args(parse("serve")).model == DEFAULT_MODEL
    with pytest.raises(ValueError, match="two models"):
        serve_cli.engine_args(parse("serve", "a.gguf", "--model", "b.gguf"))


def test_serve_with_two_models_fails_before_loading(capsys):
    assert cli.main(["serve", "a.gguf", "--model", "b.gguf"]) == 2
    assert "two models" in capsys.readouterr().err


def test_version_is_the_packages(capsys):
    # pyproject's [project] version (a regex: tomllib is Python >= 3.11, and the suite runs on 3.10 too)
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert tinyvllm.__version__ == version
    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as e:
            cli.main([flag])
        assert e.value.code == 0 and capsys.readouterr().out == f"tinyvllm {version}\n"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in (f"(default: {DEFAULT_MODEL})", "(default: cpu)", "(default: 32)", "(default: 512)",
                    "(default: float16)", "(default: 16)", "(default: True)", "(default: 0)",
                    "(default: physical cores)"):
        assert default in text, (command, default)
    assert "(default: None)" not in text
    if command in ("generate", "chat"):
        assert "--max-tokens MAX_TOKENS tokens to generate at most per answer (default: 256)" in text
        assert "greedy" in text and "(default: 0.0)" in text and "1.0" in text  # the temperature choice, explained
    if command == "serve":
        assert "(default: 8000)" in text and "sample at 1.0" in text


@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
def test_n_is_gone(command, capsys):
    """-n meant max tokens in generate/chat and prompts in bench, never the API's n: it is refused."""
    with pytest.raises(SystemExit) as e:
        parse(command, "-n", "8")
    assert e.value.code == 2 and "-n" in capsys.readouterr().err
    assert parse("generate", "--max-tokens", "8").max_tokens == 8
    assert parse("bench", "--num-prompts", "8").num_prompts == 8


def test_bench_url_refuses_engine_flags(capsys):
    """Against a server, the engine is the server's: engine flags other than the model's would do nothing."""
    assert cli.main(["bench", "--url", "http://127.0.0.1:9", "--model", "/no/such.gguf", "--max-num-seqs", "4",
                     "--kv-cache-dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype, --max-num-seqs: engine arguments are for offline runs" in err
