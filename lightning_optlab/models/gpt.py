"""Backward-compatible home of ``GPT`` and ``GPTConfig`` (now in :mod:`.transformer` and :mod:`.config`)."""

from .config import GPTConfig
from .transformer import GPT

__all__ = ["GPT", "GPTConfig"]
