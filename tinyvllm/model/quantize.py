"""Load-time quantization of float checkpoints (HF safetensors) into the GGML block formats the
native kernels run: `int8` -> Q8_0, `int4` -> Q4_0 (symmetric, 32 weights per scale)."""
from __future__ import annotations

import dataclasses

import numpy as np

from tinyvllm.model.weights import F16, F32, Q4_0, Q8_0, ModelWeights, WeightTensor

SCHEMES = {"int8": Q8_0, "q8_0": Q8_0, "int4": Q4_0, "q4_0": Q4_0}


def quantize_weights(weights: ModelWeights, scheme: str | None) -> ModelWeights:
    """Quantize every float matrix (not norms or biases: they are tiny and precision-sensitive).
    Weights that are already quantized (GGUF) stay as stored: re-quantizing only adds error."""
    if scheme in (None, "none"):
        return weights
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {sorted(SCHEMES)} or None, got {scheme!r}")
    qtype = SCHEMES[scheme]
    import gguf  # here, not at module level: GGUF loads (no quantization) never pay its ~60 ms import
    tensors = {}
    for name, t in weights.tensors.items():
        if t.dtype in (F32, F16) and len(t.shape) == 2 and t.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(np.asarray(t.data, dtype=np.float32), gguf.GGMLQuantizationType(qtype))
            t = WeightTensor(name, qtype, t.shape, np.ascontiguousarray(blocks))
        tensors[name] = t
    return dataclasses.replace(weights, tensors=tensors)
