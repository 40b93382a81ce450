"""μP for Hugging Face causal LMs (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...), from their config.

``mup_hf_model(config, base_width=...)`` builds the model of ``config`` in μP relative to the same
architecture at ``base_width``:

* base shapes: the base (``base_width``) and mup's delta model (twice the base width) are built on
  the ``meta`` device from the user's config class with the width changed (no memory, no weights);
  the width changes through the head count at a fixed head size (so attention's 1/sqrt(d_head) is
  μP's 1/d_head up to a constant), the MLP width in proportion;
* readout multiplier: the output layer becomes mup's ``MuReadout`` (``MuSharedReadout`` for tied
  embeddings, GPT-2), which divides its input by the width multiplier (base_width / width);
* init: hidden matrices get their std divided by sqrt(fan-in multiplier) (TP5, Table 3); the
  embedding and the readout keep the config's ``initializer_range``. At ``base_width`` the model is
  the config's own standard-parametrization model.

Then ``configure(model, name, lr=base_lr, mup=True)`` (or ``CausalLMModule(model, spec)`` with
``spec.mup = True``) rewrites the per-group learning rates. ``CausalLMModule(hf_model, spec, mup=base_width)``
does both for a model built from its config (:func:`hf_to_mup`, in place).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .._extras import require
from .shapes import fan_in_mults, set_base_shapes

__all__ = ["config_at_width", "hf_base_shapes", "hf_to_mup", "is_hf_model", "mup_hf_model"]

#: (width, heads, kv heads, MLP width) attribute names of the supported config families
_FIELDS = {"hidden_size": ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
           "n_embd": ("n_embd", "n_head", None, "n_inner")}


def _fields(config: Any) -> tuple[str, str, str | None, str]:
    for key, fields in _FIELDS.items():
        if hasattr(config, key) and hasattr(config, fields[1]):
            return fields
    raise ValueError(f"{type(config).__name__} has neither hidden_size/num_attention_heads (LLaMA-like) nor n_embd/n_head "
                     "(GPT-2-like): build the base and delta models yourself and call "
                     "lightning_optlab.mup.set_base_shapes(model, base, delta=delta)")


def config_at_width(config: Any, width: int) -> Any:
    """A copy of ``config`` at ``width``: heads scaled at a fixed head size, the MLP width in proportion."""
    w_key, h_key, kv_key, ffn_key = _fields(config)
    d, heads = getattr(config, w_key), getattr(config, h_key)
    head_dim = getattr(config, "head_dim", None) or d // heads
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head size {head_dim} of {type(config).__name__}; "
                         "μP here scales the head count at a fixed head size: pick widths that are multiples of it")
    out = copy.deepcopy(config)
    new_heads = width // head_dim
    setattr(out, w_key, width)
    setattr(out, h_key, new_heads)
    if kv_key and getattr(config, kv_key, None):
        group = heads // getattr(config, kv_key)
        if new_heads % group:
            raise ValueError(f"width {width} gives {new_heads} heads, not a multiple of the query groups ({group})")
        setattr(out, kv_key, new_heads // group)
    if hasattr(config, "head_dim"):
        out.head_dim = head_dim
    ffn = getattr(config, ffn_key, None)
    ffn = ffn if ffn is not None else 4 * d  # GPT-2's n_inner=None means 4·n_embd
    if (ffn * width) % d:
        raise ValueError(f"the MLP width {ffn} does not scale to width {width} (from {d}) in whole numbers")
    setattr(out, ffn_key, ffn * width // d)
    return out


def _build(config: Any, meta: bool) -> nn.Module:
    transformers = require("transformers")
    if meta:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def hf_base_shapes(model: nn.Module, base_width: int) -> nn.Module:
    """Attach μP base shapes to a Hugging Face model, from its config at ``base_width`` and ``2·base_width``
    (both built on ``meta``). Nothing is re-initialized and no readout multiplier is added: use
    :func:`mup_hf_model` for a model ready for μP."""
    config = model.config
    base = _build(config_at_width(config, base_width), meta=True)
    delta = _build(config_at_width(config, 2 * base_width), meta=True)
    return set_base_shapes(model, base, delta=delta)


def _mu_readout(model: nn.Module, zero_readout: bool) -> None:
    from mup import MuReadout, MuSharedReadout

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output layer of {type(model).__name__} is a {type(head).__name__}, not an nn.Linear: "
                         "replace it with mup.MuReadout yourself")
    tied = head.weight is emb.weight
    if tied:
        if zero_readout:
            raise ValueError("zero_readout=True with tied embeddings would zero the token embedding; untie them "
                             "(config.tie_word_embeddings=False) to zero-initialize the readout")
        new = MuSharedReadout(emb.weight, bias=head.bias is not None)
    else:
        new = MuReadout(head.in_features, head.out_features, bias=head.bias is not None,
                        device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.zeros_like(head.weight) if zero_readout else head.weight)
    if head.bias is not None:
        with torch.no_grad():
            new.bias.copy_(head.bias)
    model.set_output_embeddings(new)


def mup_hf_model(config: Any, *, base_width: int, zero_readout: bool = False,
                 factory: Callable[[Any], nn.Module] | None = None) -> nn.Module:
    """The Hugging Face causal LM of ``config`` in μP relative to the same architecture at ``base_width``.

    Args:
        config: a ``transformers`` config (``LlamaConfig``, ``GPT2Config``, ...) at the target width.
        base_width: the tuned proxy's width (≤ the target's; a multiple of the head size).
        zero_readout: zero-initialize the readout (TP5's advice; needs untied embeddings).
        factory: builds the model from a config (default ``AutoModelForCausalLM.from_config``).

    Example:
        >>> cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=16, ...)
        >>> model = mup_hf_model(cfg, base_width=256)
        >>> configure(model, "adamw", lr=3e-3, mup=True)       # the proxy's lr
    """
    w_key = _fields(config)[0]
    if base_width > getattr(config, w_key):
        raise ValueError(f"base_width {base_width} is larger than the model's width {getattr(config, w_key)}; "
                         "μP scales up from a narrower proxy")
    model = factory(config) if factory is not None else _build(config, meta=False)
    return hf_to_mup(model, base_width=base_width, zero_readout=zero_readout)


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` looks like a Hugging Face causal LM: a ``config`` of a supported family (hidden_size /
    num_attention_heads or n_embd / n_head) and ``get_output_embeddings``."""
    config = getattr(model, "config", None)
    return (callable(getattr(model, "get_output_embeddings", None)) and config is not None
            and any(hasattr(config, k) and hasattr(config, f[1]) for k, f in _FIELDS.items()))


def hf_to_mup(model: nn.Module, *, base_width: int, zero_readout: bool = False) -> nn.Module:
    """Put a freshly initialized Hugging Face causal LM into μP relative to its architecture at ``base_width``,
    in place: the readout becomes mup's ``MuReadout`` (``MuSharedReadout`` when tied), base shapes come from
    the model's config at ``base_width`` and ``2·base_width`` (built on ``meta``), and hidden matrices get their
    init std divided by sqrt(fan-in multiplier). A model already holding a ``MuReadout`` (from
    :func:`mup_hf_model`) only gets its base shapes: it is not re-initialized. Returns ``model``.

    ``CausalLMModule(model, spec, mup=base_width)`` calls this for a Hugging Face model.
    """
    w_key = _fields(model.config)[0]
    width = getattr(model.config, w_key)
    if isinstance(base_width, bool) or not isinstance(base_width, int) or not 0 < base_width <= width:
        raise ValueError(f"base_width must be a width in [1, {width}] (the model's {w_key}), got {base_width!r}; "
                         "μP scales up from a narrower proxy")
    if type(model.get_output_embeddings()).__name__ in ("MuReadout", "MuSharedReadout"):
        return hf_base_shapes(model, base_width)
    _mu_readout(model, zero_readout)  # first: the new readout's weight then gets its base shape too
    hf_base_shapes(model, base_width)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, mult in fan_in_mults(model).items():
            if mult != 1.0:
                params[name].mul_(mult ** -0.5)
    return model
