"""Speculative decoding: proposers (n-gram lookup, a draft model), verification by rejection
sampling, and the decoder the engine calls around its step."""
from .config import SpeculativeConfig
from .decoder import SpeculativeDecoder
from .draft_model import DraftModelProposer
from .ngram import NgramProposer
from .rejection import RejectionSampler

__all__ = ["DraftModelProposer", "NgramProposer", "RejectionSampler", "SpeculativeConfig", "SpeculativeDecoder"]
