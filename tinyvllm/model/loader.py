"""load_model(path): a .gguf file, a dir holding exactly one .gguf, or a Hugging Face checkpoint dir."""
from __future__ import annotations

from pathlib import Path

from tinyvllm.model.errors import ModelFormatError, ModelNotFoundError
from tinyvllm.model.gguf_loader import load_gguf
from tinyvllm.model.hf_loader import load_hf_dir
from tinyvllm.model.weights import ModelWeights


def load_model(path) -> ModelWeights:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path does not exist: {p}")
    if p.is_file():
        return load_gguf(p)  # any single file is treated as GGUF; a non-GGUF file fails the magic check
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0])
    if (p / "config.json").is_file():
        return load_hf_dir(p)
    if ggufs:
        raise ModelFormatError(f"{p}: holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); "
                               "pass the one to load")
    raise ModelFormatError(f"{p}: neither a .gguf file nor a directory with config.json + *.safetensors")
