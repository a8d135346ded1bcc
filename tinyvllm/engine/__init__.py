from .llm_engine import LLMEngine, RequestsFailed

__all__ = ["LLMEngine", "RequestsFailed"]
