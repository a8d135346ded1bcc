"""Engine-side data structures backed by the native core."""
from .block_manager import BlockManager

__all__ = ["BlockManager"]
