"""Named model sizes for both families, and ``build_model``: one registry, one way in.

``build_model("llama-150m", qk_layernorm=True, z_loss=1e-4)`` builds a preset with overrides;
``build_model(LlamaConfig(...))`` builds a config. Parameter counts follow the literature's
convention (GPT-2, LLaMA, OLMo): **all** parameters, embeddings included, a tied embedding
counted once. Each named size is within 10% of its name (tested on the ``meta`` device).

Shapes (d = width, L = layers; GPT family: tied embeddings, vocab 50304, GELU MLP 4·d; LLaMA
family: untied, vocab 32000, SwiGLU MLP 8·d/3 rounded up to a multiple of 64):

======  =====================  =====================  =======================================
size    gpt2-…  (L × d, heads)  llama-…  (L × d, heads)  role
======  =====================  =====================  =======================================
tiny    2 × 64, 4 (vocab 256)  2 × 64, 4 (vocab 256)  tests and the CPU demo
50m     8 × 512, 8             6 × 512, 8             μP proxy (Schlotthauer et al. 2025)
124m    12 × 768, 12           —                      GPT-2 small (Radford et al. 2019)
150m    16 × 768, 12           14 × 768, 12           Zhao et al. 2025 sizes (OLMo-style
300m    20 × 1024, 16          18 × 1024, 16          widths and depths chosen here; the
600m    18 × 1536, 12          18 × 1536, 12          paper's exact shapes are not
1.2b    22 × 2048, 16          20 × 2048, 16          reproduced)
2.7b    32 × 2560, 32          32 × 2560, 20          target (Schlotthauer et al. 2025;
                                                      GPT-3 2.7B's shape, Brown et al. 2020)
======  =====================  =====================  =======================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .config import GPTConfig, LlamaConfig, TransformerConfig
from .transformer import GPT, Llama, TransformerLM

__all__ = ["PRESETS", "available_presets", "preset_config", "register_preset", "resolve_config", "build_model"]

#: preset name -> config (use :func:`preset_config` for a copy you may change)
PRESETS: dict[str, TransformerConfig] = {}

_GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64 (faster matmuls)
_LLAMA_VOCAB = 32000  # LLaMA's SentencePiece vocabulary (also the size of T5's, used by Zhao et al.)


def register_preset(name: str, config: TransformerConfig, *, overwrite: bool = False) -> None:
    """Add ``config`` to :data:`PRESETS` under ``name`` (lower case); refuses to replace one unless ``overwrite``."""
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"a preset must be a TransformerConfig, got {type(config).__name__}")
    key = name.lower()
    if key in PRESETS and not overwrite:
        raise ValueError(f"preset {name!r} already exists; pass overwrite=True to replace it")
    PRESETS[key] = config


def available_presets() -> list[str]:
    """Every preset name, sorted."""
    return sorted(PRESETS)


def preset_config(name: str) -> TransformerConfig:
    """A fresh copy of the named preset's config; an unknown name lists the known ones."""
    key = name.lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(available_presets())}")
    return dataclasses.replace(PRESETS[key])


def _with_overrides(config: TransformerConfig, overrides: Mapping[str, Any]) -> TransformerConfig:
    unknown = sorted(set(overrides) - set(config.field_names()))
    if unknown:
        raise ValueError(
            f"unknown model config field(s) {', '.join(unknown)}; fields are: {', '.join(config.field_names())}"
        )
    return dataclasses.replace(config, **overrides)  # re-runs __post_init__: overrides are validated


def _config_from_mapping(spec: Mapping[str, Any]) -> TransformerConfig:
    """``{"preset": name, **overrides}`` or ``{"family": "gpt2" | "llama", **fields}``."""
    spec = dict(spec)
    if "preset" in spec:
        return _with_overrides(preset_config(spec.pop("preset")), spec)
    family = spec.pop("family", "gpt2")
    classes = {"gpt2": GPTConfig, "gpt": GPTConfig, "llama": LlamaConfig}
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; families are: gpt2, llama")
    return _with_overrides(classes[family](), spec)


def resolve_config(name_or_config: str | TransformerConfig | Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """The validated config :func:`build_model` would build, without building it.

    Takes what :func:`build_model` takes (a preset name, a config, or a mapping) plus field overrides.
    """
    if isinstance(name_or_config, str):
        return _with_overrides(preset_config(name_or_config), overrides)
    if isinstance(name_or_config, TransformerConfig):
        return _with_overrides(name_or_config, overrides)
    if isinstance(name_or_config, Mapping):
        return _with_overrides(_config_from_mapping(name_or_config), overrides)
    raise TypeError(
        f"build_model takes a preset name, a TransformerConfig or a mapping, got {type(name_or_config).__name__}"
    )


def build_model(name_or_config: str | TransformerConfig | Mapping[str, Any], **overrides: Any) -> TransformerLM:
    """Build a model from a preset name, a config, or a mapping, with field overrides.

    Args:
        name_or_config: a preset name (see :func:`available_presets`), a :class:`TransformerConfig`
            (``GPTConfig``/``LlamaConfig``), or a mapping ``{"preset": name, **fields}`` /
            ``{"family": "gpt2" | "llama", **fields}`` (as a YAML block gives it).
        **overrides: config fields to change, e.g. ``vocab_size=tokenizer.vocab_size``.

    Returns:
        :class:`GPT` for a GPT-family config, :class:`Llama` for a LLaMA-family config, else
        :class:`TransformerLM`. Build under ``with torch.device("meta"):`` to size a model without
        memory, or under ``torch.device("cuda")`` to allocate it on the GPU directly.

    Example:
        >>> model = build_model("llama-tiny", vocab_size=512)
        >>> model = build_model("gpt2-150m", qk_layernorm=True, z_loss=1e-4)  # the studies' "standard"
    """
    config = resolve_config(name_or_config, **overrides)
    if isinstance(config, LlamaConfig):
        return Llama(config)
    if isinstance(config, GPTConfig):
        return GPT(config)
    return TransformerLM(config)


def _gpt2(n_layer: int, n_embd: int, n_head: int, **kw: Any) -> GPTConfig:
    kw.setdefault("vocab_size", _GPT2_VOCAB)
    kw.setdefault("block_size", 1024)
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, tie_embeddings=True, **kw)


def _llama(n_layer: int, n_embd: int, n_head: int, **kw: Any) -> LlamaConfig:
    kw.setdefault("vocab_size", _LLAMA_VOCAB)
    kw.setdefault("block_size", 1024)
    return LlamaConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **kw)


for _name, _cfg in {
    "gpt2-tiny": _gpt2(2, 64, 4, vocab_size=256, block_size=128),
    "gpt2-50m": _gpt2(8, 512, 8),
    "gpt2-124m": _gpt2(12, 768, 12),
    "gpt2-150m": _gpt2(16, 768, 12),
    "gpt2-300m": _gpt2(20, 1024, 16),
    "gpt2-600m": _gpt2(18, 1536, 12),
    "gpt2-1.2b": _gpt2(22, 2048, 16),
    "gpt2-2.7b": _gpt2(32, 2560, 32),
    "llama-tiny": _llama(2, 64, 4, vocab_size=256, block_size=128),
    "llama-50m": _llama(6, 512, 8),
    "llama-150m": _llama(14, 768, 12),
    "llama-300m": _llama(18, 1024, 16),
    "llama-600m": _llama(18, 1536, 12),
    "llama-1.2b": _llama(20, 2048, 16),
    "llama-2.7b": _llama(32, 2560, 20),
}.items():
    register_preset(_name, _cfg)
del _name, _cfg
