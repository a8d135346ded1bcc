"""Errors raised while locating or loading a model (kept tiny so every module can import it)."""


class ModelFormatError(ValueError):
    """The model file/dir is malformed, unsupported, or inconsistent with its own config."""


class ModelNotFoundError(ModelFormatError):
    """No model could be found or downloaded for the given name or path.

    A ModelFormatError subclass so callers (CLI, LLM) can catch one type for "can't get a model"."""
