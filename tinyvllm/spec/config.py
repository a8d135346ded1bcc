"""SpeculativeConfig: vLLM's `speculative_config` dict (or its JSON, from --speculative-config), checked."""
import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None          # draft_model: alias, GGUF file or HF directory of the draft
    prompt_lookup_max: int = 4        # ngram: longest suffix looked up in the sequence's own tokens
    prompt_lookup_min: int = 1        # ngram: shortest suffix that may match
    # No draft tokens in a step whose running batch is larger than this: at large batches the forward is
    # compute-bound and verifying k extra tokens per sequence costs more than the accepted ones save.
    disable_by_batch_size: int | None = None
    # A sequence whose recent acceptance (exponential average) is below this stops drafting for a while.
    min_acceptance_rate: float = 0.0
    draft_quantization: str | None = None

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """None, a dict, a JSON object string or a SpeculativeConfig -> a checked config (ValueError)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a dict (or a JSON object), e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        value = dict(value)
        if value.get("method") is None and value.get("model"):
            value["method"] = "draft_model"  # vLLM infers the method from a draft model name
        if value.get("method") not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)} (got {value.get('method')!r})")
        k = value.get("num_speculative_tokens")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer >= 1 (got {k!r})")
        cfg = cls(**value)
        cfg._check()
        return cfg

    def _check(self) -> None:
        def positive_int(name, v, allow_none=False):
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1 (got {v!r})")
        if self.num_speculative_tokens > 16:
            raise ValueError("speculative_config.num_speculative_tokens is at most 16 here")
        if self.method == "ngram":
            positive_int("prompt_lookup_max", self.prompt_lookup_max)
            positive_int("prompt_lookup_min", self.prompt_lookup_min)
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max")
            if self.model is not None:
                raise ValueError("speculative_config: method 'ngram' takes no draft model")
        elif not self.model or not isinstance(self.model, str):
            raise ValueError("speculative_config: method 'draft_model' needs 'model' (a draft model path or name)")
        positive_int("disable_by_batch_size", self.disable_by_batch_size, allow_none=True)
        if not isinstance(self.min_acceptance_rate, (int, float)) or not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError("speculative_config.min_acceptance_rate must be in [0, 1]")
