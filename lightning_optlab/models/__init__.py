"""Reference decoder-only language models (plain PyTorch): GPT-2 and LLaMA families, presets by name.

>>> from lightning_optlab.models import build_model
>>> model = build_model("llama-tiny")            # or GPT(GPTConfig(...)), Llama(LlamaConfig(...))
>>> logits = model(idx)                           # (B, T, vocab_size)
>>> loss = model.loss(logits, targets)            # float32 cross-entropy + z-loss
"""

from __future__ import annotations

from torch import Tensor, nn

from .config import GPTConfig, LlamaConfig, TransformerConfig
from .layers import CausalSelfAttention, apply_rotary, rotary_cos_sin
from .presets import PRESETS, available_presets, build_model, preset_config, register_preset, resolve_config
from .transformer import GPT, Llama, TransformerLM

__all__ = [
    "TransformerConfig",
    "GPTConfig",
    "LlamaConfig",
    "TransformerLM",
    "GPT",
    "Llama",
    "CausalSelfAttention",
    "rotary_cos_sin",
    "apply_rotary",
    "PRESETS",
    "available_presets",
    "preset_config",
    "register_preset",
    "resolve_config",
    "build_model",
    "set_record_max_logit",
    "max_attention_logits",
]


def set_record_max_logit(model: nn.Module, flag: bool) -> int:
    """Switch max-logit recording on or off in every attention module of ``model``.

    An attention module is any submodule with a ``record_max_logit`` attribute (our
    :class:`CausalSelfAttention`). Switching off also clears ``max_logit``. Returns the number of
    modules switched (0 means the model has none: a callback can warn once).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "record_max_logit"):
            module.record_max_logit = bool(flag)
            if not flag:
                module.max_logit = None
            count += 1
    return count


def max_attention_logits(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: max pre-softmax attention logit}`` recorded by the last forward (recording modules only)."""
    return {
        name: module.max_logit
        for name, module in model.named_modules()
        if getattr(module, "record_max_logit", False) and getattr(module, "max_logit", None) is not None
    }
