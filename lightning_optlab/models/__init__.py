"""Reference decoder-only language models (plain PyTorch)."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
