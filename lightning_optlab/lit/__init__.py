"""Lightning glue: the causal-LM LightningModule and the language-model DataModule."""

from .datamodule import LMDataModule
from .fsdp import FSDPConfig
from .module import CausalLMModule

__all__ = ["CausalLMModule", "FSDPConfig", "LMDataModule"]
