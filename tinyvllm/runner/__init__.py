"""Model runners: run one batch of tokens through a backend and return logits."""
from .native_runner import NativeModelRunner

__all__ = ["NativeModelRunner"]
