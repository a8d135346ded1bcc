"""Structured outputs: completions constrained to a JSON schema, a regex, a choice or a grammar, with
llguidance (the `structured` extra) computing which tokens may come next."""
from .grammar import compile_grammar
from .manager import StructuredOutputs, structured_off_reason, structured_outputs_enabled

__all__ = ["StructuredOutputs", "compile_grammar", "structured_off_reason",
           "structured_outputs_enabled"]
