"""Model runners: run one batch of tokens through a backend and return logits.

`cpu` is the native C++ core; `tinygrad` (optional extra, `pip install tinyvllm[gpu]`) runs on
tinygrad's default device. tinygrad is imported only when that runner is asked for.
"""
from .native_runner import NativeModelRunner


def runner_for(device: str):
    """(runner class, keyword arguments) for an LLM(device=...) string: "cpu", "tinygrad" or
    "tinygrad:<DEV>" (e.g. "tinygrad:CUDA"; plain "tinygrad" follows tinygrad's DEV / Device.DEFAULT)."""
    if device == "cpu":
        return NativeModelRunner, {}
    name, _, dev = str(device).partition(":")
    if name == "tinygrad":
        from .tinygrad_runner import TinygradModelRunner, import_tinygrad
        import_tinygrad()  # fail now, with the install hint, before any model is loaded
        return TinygradModelRunner, ({"device": dev} if dev else {})
    raise ValueError(f"unknown device {device!r}: use 'cpu' (native core), 'tinygrad' or 'tinygrad:<DEV>'")


def __getattr__(name):  # lazy: `from tinyvllm.runner import TinygradModelRunner` imports tinygrad only then
    if name == "TinygradModelRunner":
        from .tinygrad_runner import TinygradModelRunner
        return TinygradModelRunner
    raise AttributeError(name)


__all__ = ["NativeModelRunner", "TinygradModelRunner", "runner_for"]
