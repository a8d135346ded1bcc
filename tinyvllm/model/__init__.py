"""Model loading: GGUF / Hugging Face checkpoints -> ModelWeights with GGUF tensor names."""
from tinyvllm.model.errors import ModelFormatError, ModelNotFoundError
from tinyvllm.model.config import ModelConfig
from tinyvllm.model.weights import ModelWeights, WeightTensor, GGMLType
from tinyvllm.model.loader import load_model
from tinyvllm.model.fetch import resolve_model, DEFAULT_MODEL

__all__ = ["load_model", "ModelConfig", "ModelWeights", "WeightTensor", "GGMLType", "ModelFormatError",
           "ModelNotFoundError", "resolve_model", "DEFAULT_MODEL"]
