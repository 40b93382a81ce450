"""Lightning glue: the causal-LM LightningModule."""

from .module import CausalLMModule

__all__ = ["CausalLMModule"]
