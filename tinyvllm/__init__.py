"""tinyvllm: a tiny vLLM for edge devices."""
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM / AsyncLLM / LLMEngine load the native core: import them lazily so `import tinyvllm` stays light.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "AsyncLLM":
        from .async_llm import AsyncLLM
        return AsyncLLM
    if name == "LLMEngine":
        from .engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'tinyvllm' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "BeamSearchParams",
           "RequestOutput", "CompletionOutput", "RequestMetrics"]
