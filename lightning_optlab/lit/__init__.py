"""Lightning glue: the causal-LM LightningModule and the language-model DataModule."""

from .datamodule import LMDataModule
from .module import CausalLMModule

__all__ = ["CausalLMModule", "LMDataModule"]
