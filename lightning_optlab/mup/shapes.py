"""Base shapes for μP, derived from a model config and a base (proxy) width or config.

μP (Yang et al. 2022, "Tensor Programs V", arXiv 2203.03466) needs, for every parameter, which
of its dimensions grow with width and by how much relative to the tuned proxy (the *base*).
The `mup` package records that as ``p.infshape`` (an ``InfShape`` of ``InfDim(base_dim, dim)``),
built by ``mup.set_base_shapes(model, base, delta=...)`` from a base model and a *delta* model
that differs from the base in width only (the dimensions that differ are the infinite ones).

Here the base and delta models are built on the ``meta`` device from the config (no memory), so
the base shapes are a pure function of ``(config, base)``: a resumed, DDP-wrapped or compiled run
recomputes the same multipliers, and :func:`base_shapes_state` / :func:`check_base_shapes` put
them in a checkpoint and compare them on load. ``p.infshape`` itself is an attribute of the
Parameter object: DDP, ``torch.compile`` (``OptimizedModule._orig_mod``) and ``load_state_dict``
keep the same objects, so they keep it; pickling a whole model may not, which is why the
state travels as plain shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from .._extras import require

mup = require("mup")  # a one-line install hint when it is missing
from mup.infshape import InfShape  # noqa: E402

from ..models import TransformerConfig, TransformerLM, build_model, resolve_config  # noqa: E402

__all__ = [
    "WIDTH_FIELDS",
    "base_config",
    "mup_config",
    "set_base_shapes",
    "build_mup_model",
    "infshapes",
    "require_base_shapes",
    "base_shapes_state",
    "check_base_shapes",
    "strip_wrapper_prefix",
    "width_mults",
    "fan_in_mults",
    "check_readout_multiplier",
]

#: config fields that μP lets differ between the proxy and the target (width, heads, depth, context)
WIDTH_FIELDS: frozenset[str] = frozenset(
    {"n_embd", "n_head", "n_kv_head", "mlp_hidden", "n_layer", "block_size", "attn_scale", "logit_scale",
     "residual_scale", "residual_init_layers"}
)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefix(name: str) -> str:
    """A parameter name without the prefixes ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _heads_for(config: TransformerConfig, width: int) -> dict[str, Any]:
    """n_head / n_kv_head at ``width``: keep the head count if it divides, else keep the head size."""
    if width % config.n_head == 0:
        return {"n_head": config.n_head, "n_kv_head": config.n_kv_head}
    if width % config.head_dim == 0:
        n_head = width // config.head_dim
        group = config.n_head // config.kv_heads
        if n_head % group:
            raise ValueError(f"width {width} gives {n_head} heads, not a multiple of the query groups ({group})")
        return {"n_head": n_head, "n_kv_head": None if config.n_kv_head is None else n_head // group}
    raise ValueError(
        f"width {width} is divisible by neither n_head ({config.n_head}) nor the head size ({config.head_dim}); "
        "pick a base width that is a multiple of one of them"
    )


def base_config(config: TransformerConfig, base: int | str | TransformerConfig | Mapping[str, Any]) -> TransformerConfig:
    """The base (proxy) config for ``config`` with the target's depth and context length.

    Args:
        config: the target model's config.
        base: a base width (the target's architecture at ``n_embd=base``, head count kept when it
            divides, else the head size), or the proxy itself (a preset name, config or mapping).

    Raises:
        ValueError: the base is wider than the target, or the architectures differ in anything
            but width, heads, depth and context (vocabulary, norm, MLP kind, positions, ...).
    """
    if isinstance(base, bool) or not isinstance(base, (int, str, TransformerConfig, Mapping)):
        raise TypeError(f"base must be a width (int), a preset name, a config or a mapping, got {type(base).__name__}")
    if isinstance(base, int):
        if base < 1:
            raise ValueError(f"base width must be an integer ≥ 1, got {base}")
        if base > config.n_embd:
            raise ValueError(
                f"base width {base} is larger than the target width {config.n_embd}; μP scales up from a "
                f"narrower proxy: use a base width ≤ {config.n_embd}"
            )
        mlp_hidden = None if config.mlp_hidden is None else max(1, round(config.mlp_hidden * base / config.n_embd))
        return dataclasses.replace(config, n_embd=base, mlp_hidden=mlp_hidden, **_heads_for(config, base))
    proxy = resolve_config(base)
    mismatched = [
        f"{f.name}: proxy {getattr(proxy, f.name)!r} vs target {getattr(config, f.name)!r}"
        for f in dataclasses.fields(TransformerConfig)
        if f.name not in WIDTH_FIELDS and getattr(proxy, f.name) != getattr(config, f.name)
    ]
    if type(proxy) is not type(config):
        mismatched.insert(0, f"family: proxy {type(proxy).__name__} vs target {type(config).__name__}")
    if mismatched:
        raise ValueError(
            "proxy and target architectures differ in more than width and depth (" + "; ".join(mismatched) + "); "
            "μP transfers hyperparameters across width only: build the proxy as the target's architecture at a smaller width"
        )
    if proxy.n_embd > config.n_embd:
        raise ValueError(
            f"proxy width {proxy.n_embd} is larger than the target width {config.n_embd}; the base must be the narrower model"
        )
    return dataclasses.replace(proxy, n_layer=config.n_layer, block_size=config.block_size)


def _plain(config: TransformerConfig) -> TransformerConfig:
    """``config`` with the μP-only fields reset (they do not change shapes)."""
    return dataclasses.replace(config, attn_scale="sqrt", logit_scale=1.0, residual_scale=1.0, residual_init_layers=None)


def mup_config(config: TransformerConfig, base: TransformerConfig) -> TransformerConfig:
    """``config`` with μP's attention scale and readout multiplier relative to ``base``.

    * attention logits scale as 1/d_head (TP5 §4, Definition 4.1): s = s_base · d_base / d_head, so
      at the base head size s equals the base's own scale (1/sqrt(d) by default);
    * logits are multiplied by base_width / width (mup's ``MuReadout`` output multiplier), times the
      base's own ``logit_scale``. The readout weight's init std stays ``init_std`` (width-independent),
      so with the multiplier it behaves like mup's ``MuReadout`` (whose ``_rescale_parameters``
      undoes the 1/sqrt(fan_in) default init for the same effect).
    """
    attn = base.attn_scale if config.head_dim == base.head_dim else base.softmax_scale * base.head_dim / config.head_dim
    logit = float(base.logit_scale) * base.n_embd / config.n_embd
    return dataclasses.replace(config, attn_scale=attn, logit_scale=logit)


def _meta_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(_plain(config))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _scaled_config(base: TransformerConfig, k: int) -> TransformerConfig:
    width = k * base.n_embd
    mlp_hidden = None if base.mlp_hidden is None else k * base.mlp_hidden
    return dataclasses.replace(base, n_embd=width, mlp_hidden=mlp_hidden, **_heads_for(base, width))


#: the largest width multiple tried for mup's delta model (and the one that decides which
#: dimensions grow with the width)
_MAX_DELTA = 64


def _delta_config(base: TransformerConfig) -> TransformerConfig:
    """mup's delta model: the smallest multiple ``k·n_embd`` (k ≥ 2) in which every dimension that
    grows with the width differs from the base. An MLP hidden size rounded up to a multiple
    (SwiGLU's ``mlp_multiple_of``) can stay equal at 2x the width (base 32 and 64 both give 256
    at a multiple of 256), and mup would then take it for a fixed dimension."""
    base_shapes = _meta_shapes(base)
    far_shapes = _meta_shapes(_scaled_config(base, _MAX_DELTA))
    growing = [
        (name, i) for name, shape in base_shapes.items()
        for i, (a, b) in enumerate(zip(shape, far_shapes[name])) if a != b
    ]
    for k in range(2, _MAX_DELTA):
        try:
            candidate = _scaled_config(base, k)
        except ValueError:  # a width the head layout does not divide
            continue
        shapes = _meta_shapes(candidate)
        if all(shapes[name][i] != base_shapes[name][i] for name, i in growing):
            return candidate
    return _scaled_config(base, _MAX_DELTA)


def _base_infshapes(base: TransformerConfig) -> dict[str, InfShape]:
    base_shapes = _meta_shapes(base)
    delta_shapes = _meta_shapes(_delta_config(base))
    return mup.make_base_shapes(base_shapes, delta_shapes)


def set_base_shapes(model: nn.Module, base: Any, delta: nn.Module | None = None) -> nn.Module:
    """Attach ``p.infshape`` to every parameter of ``model`` (through ``mup.set_base_shapes``).

    Args:
        model: the model to train. Prefixes added by ``torch.compile``/DDP are ignored.
        base: for a :class:`TransformerLM`: a base width, the proxy (preset name, config or mapping);
            for any model: a base ``nn.Module`` (with ``delta``, a second base-like model of another
            width), or a base-shapes mapping ``{name: [base dim or None, ...]}`` as
            :func:`base_shapes_state` returns it.
        delta: only with an ``nn.Module`` base (mup's delta model).
    Returns:
        ``model``. Nothing is re-initialized: use :func:`build_mup_model` for μP's init.
    """
    target = _unwrap(model)
    if isinstance(base, nn.Module):
        base_infshapes = mup.make_base_shapes(base, delta) if delta is not None else mup.shape.get_shapes(base)
    elif isinstance(base, Mapping) and base and all(isinstance(v, (list, tuple, InfShape)) for v in base.values()):
        base_infshapes = {k: v if isinstance(v, InfShape) else InfShape.from_base_shape(list(v)) for k, v in base.items()}
    elif isinstance(target, TransformerLM):
        base_infshapes = _base_infshapes(base_config(target.config, base))
    else:
        raise TypeError(
            "for a model that is not one of the reference TransformerLMs, base must be an nn.Module (with delta) "
            f"or a base-shapes mapping, got {type(base).__name__}"
        )
    names = {n for n, _ in target.named_parameters()}
    if set(base_infshapes) != names:
        extra, missing = sorted(set(base_infshapes) - names), sorted(names - set(base_infshapes))
        raise ValueError(
            f"base shapes do not match the model's parameters (base only: {extra[:3]}, model only: {missing[:3]}); "
            "the proxy must have the target's architecture"
        )
    mup.set_base_shapes(target, base_infshapes, rescale_params=False, do_assert=False)
    for name, p in target.named_parameters():
        for d, s in zip(p.infshape, p.shape):
            if d.isinf() and s < d.base_dim:
                raise ValueError(
                    f"{name}: width {s} is smaller than the base's {d.base_dim}; the base width must not exceed the model's"
                )
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or (getattr(model, "module", None) if type(model).__name__ in (
            "DistributedDataParallel", "DataParallel") else None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def build_mup_model(
    model: str | TransformerConfig | Mapping[str, Any], base: int | str | TransformerConfig | Mapping[str, Any],
    *, depth: str | None = None, base_depth: int | None = None, **overrides: Any,
) -> TransformerLM:
    """A reference model in μP relative to ``base``: μP config, base shapes and fan-in init.

    Args:
        model: the target (preset name, config or mapping, as for ``build_model``).
        base: the base width or the proxy (see :func:`base_config`).
        depth: the depth rule, ``"none"`` (default: width only), ``"depth_mup"`` (α = 1/2) or
            ``"completep"`` (α = 1); see :mod:`lightning_optlab.mup.depth`. It sets the residual-branch
            multiplier, keeps the proxy's residual init, and tags the branch parameters for the
            per-family depth corrections of η, λ and ε.
        base_depth: the proxy's number of layers; default the proxy's own ``n_layer`` (required when
            ``base`` is a width).
        **overrides: config fields of the target (e.g. ``vocab_size``, ``zero_readout=True``).

    At the base width (and, with a depth rule, the base depth) the model is the plain
    (standard-parametrization) model with the same initial weights under the same seed. Example:
        >>> model = build_mup_model("llama-2.7b", base="llama-50m", depth="completep", vocab_size=32000)
    """
    from .depth import check_depth_rule, depth_config, tag_depth

    rule = check_depth_rule(depth)
    target = resolve_config(model, **overrides)
    if "vocab_size" in overrides and not isinstance(base, int):  # e.g. the datamodule's tokenizer, for both
        base = resolve_config(base, vocab_size=overrides["vocab_size"])
    if rule != "none" and base_depth is None:
        if isinstance(base, int):
            raise ValueError(f"depth={rule!r} with a base width ({base}) needs base_depth, the proxy's number of "
                             "layers: give base_depth=..., or the proxy itself as base (its n_layer is the base depth)")
        base_depth = resolve_config(base).n_layer
    base_cfg = base_config(target, base)
    cfg = mup_config(target, base_cfg)
    if rule != "none":
        cfg = depth_config(cfg, rule, base_depth)
    net = build_model(cfg)  # the same random draws as the SP model
    set_base_shapes(net, base_cfg)
    with torch.no_grad():  # = init_weights(fan_in_mults=...) from the same draws
        for name, mult in fan_in_mults(net).items():
            if mult != 1.0:
                dict(net.named_parameters())[name].mul_(mult**-0.5)
    net.optlab_mup_base = base_cfg  # type: ignore[assignment]  # the proxy config, for reports and checkpoints
    if rule != "none":
        tag_depth(net, rule, base_depth)
    return net


def fan_in_mults(model: nn.Module) -> dict[str, float]:
    """``{name: fan-in width multiplier}`` of the matrix-like parameters: what ``init_weights(fan_in_mults=...)``
    takes to re-initialize a μP model (e.g. one built on the meta device, after ``to_empty``)."""
    return {n: float(s[1].width_mult()) for n, s in infshapes(model).items() if s.ninf() == 2}


def infshapes(model: nn.Module) -> dict[str, InfShape]:
    """``{parameter name (wrapper prefixes stripped): p.infshape}``; raises if any is missing."""
    require_base_shapes(model)
    return {strip_wrapper_prefix(n): p.infshape for n, p in model.named_parameters()}


def require_base_shapes(model_or_params: nn.Module | Any) -> None:
    """Raise a ValueError naming the fix when a parameter has no ``infshape``."""
    named = model_or_params.named_parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    missing = [n for n, p in named if not hasattr(p, "infshape")]
    if missing:
        raise ValueError(
            f"mup base shapes missing for {len(missing)} parameter(s) (e.g. {missing[0]!r}): call "
            "lightning_optlab.mup.set_base_shapes(model, base) or build the model with "
            "lightning_optlab.mup.build_mup_model(preset, base=...) before asking for μP"
        )


def base_shapes_state(model: nn.Module) -> dict[str, list[int | None]]:
    """``{name: [base dim, or None for a finite dim]}``: the base shapes as plain data (checkpoint, JSON)."""
    return {n: list(s.base_shape()) for n, s in infshapes(model).items()}


def check_base_shapes(model: nn.Module, state: Mapping[str, list[int | None]]) -> None:
    """Raise if ``model``'s base shapes differ from ``state`` (a resumed run with other multipliers)."""
    mine = base_shapes_state(model)
    diff = sorted(n for n in set(mine) | set(state) if mine.get(n) != (list(state[n]) if n in state else None))
    if diff:
        raise ValueError(
            f"the checkpoint's μP base shapes differ from this model's for {len(diff)} parameter(s) (e.g. {diff[0]!r}: "
            f"checkpoint {state.get(diff[0])}, model {mine.get(diff[0])}); resume with the same mup base as the run that saved it"
        )


def width_mults(model: nn.Module) -> dict[str, float]:
    """``{name: width multiplier}`` (mup's ``InfShape.width_mult``: fan-in for matrices)."""
    return {n: float(s.width_mult()) for n, s in infshapes(model).items()}



def check_readout_multiplier(model: nn.Module) -> None:
    """Raise when ``model`` has μP base shapes but its logits lack μP's readout multiplier.

    μP's learning rates assume the logits are multiplied by base_width / width (mup's ``MuReadout``,
    the reference models' ``logit_scale``); with a plain readout the forward pass is the standard
    parametrization and the μP learning rates would silently train something else. Passes for a
    ``MuReadout``/``MuSharedReadout``, a reference model built by :func:`build_mup_model`, a model at
    the base width, or a model that declares ``optlab_mup_readout = True`` (it applies the multiplier).
    """
    from ..params import readout_module_name

    target = _unwrap(model)
    if getattr(target, "optlab_mup_readout", False):
        return
    name = readout_module_name(target)
    if name is None:
        return
    readout = target.get_submodule(name)
    if type(readout).__name__ in ("MuReadout", "MuSharedReadout"):
        return
    weight = getattr(readout, "weight", None)
    shape = getattr(weight, "infshape", None)
    if shape is None or float(shape.width_mult()) == 1.0:
        return
    mult = float(shape.width_mult())
    # a reference model (possibly inside a LightningModule) multiplies its logits by config.logit_scale:
    # build_mup_model sets it to base_width / width (times the base's own); any value ≠ 1 is a multiplier
    lms = [m for m in target.modules() if isinstance(m, TransformerLM) and any(p is weight for p in m.parameters())]
    if lms and lms[0].config.logit_scale != 1.0:
        return
    raise ValueError(
        f"the model has μP base shapes (width multiplier {mult:g}) but its readout {name!r} is a plain "
        f"{type(readout).__name__} without μP's 1/width output multiplier, so μP learning rates would train a "
        "standard-parametrization forward pass. Build the model with lightning_optlab.mup.build_mup_model(preset, "
        "base=...) (reference models) or lightning_optlab.mup.mup_hf_model(config, base_width=...) (Hugging Face "
        "models), or replace the readout by mup.MuReadout; a model that applies the multiplier itself can declare "
        "optlab_mup_readout = True"
    )
