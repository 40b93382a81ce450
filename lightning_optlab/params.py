"""Parameter roles, decided once for the configurator, μP and the callbacks.

Every parameter of an ``nn.Module`` gets one role:

* ``embedding`` — token or position embeddings (``nn.Embedding`` weights, parameters named
  like ``wte``/``wpe``/``embed_tokens``/``pos_emb``); a readout weight tied to an embedding is
  the same tensor and keeps the role ``embedding``, so by default it is **not** decayed (GPT-2's tied
  ``wte``); to decay it set ``overrides={"embedding": {"weight_decay": wd}}`` (every embedding), or give
  it the readout's role and decay with ``role_patterns={r"wte\.weight$": "readout"}``;
* ``readout`` — the layer that produces the logits: a module the model names as such
  (an ``optlab_readout = "<submodule name>"`` attribute on any module, mup's ``MuReadout``, a module named ``lm_head``/``readout``/
  ``output``/``output_layer``/``head``/``unembed``/``classifier``), else (a guess, with a warning) the
  last ``nn.Linear`` whose output size is the token embedding's row count (the vocabulary), else the
  last ``nn.Linear`` registered in the module tree;
* ``norm`` — weights and biases of normalization layers (any module whose class name contains
  ``Norm``: LayerNorm, RMSNorm, GroupNorm, BatchNorm, ...);
* ``bias`` — other bias vectors and any other 0-/1-D parameter;
* ``hidden`` — every other matrix (and ≥ 2-D tensor).

A role guessed by a fallback rule (the readout as above; an embedding or position table recognized
only by its name, e.g. a bare ``nn.Parameter`` named ``pos_emb``; any other bare ≥ 2-D
``nn.Parameter``, taken as ``hidden``) warns, naming the parameter, the role given and the fix
(``role_patterns``). Hugging Face ``Conv1D`` weights, stored ``(in_features, out_features)``, are
tagged ``p.optlab_in_out = True`` for the optimizers that read a matrix's orientation (Muon's shape
factor; Adam-mini refuses them: :func:`conv1d_to_linear` converts such a model exactly). Fused attention
projections (``c_attn``, ``qkv``, ``Wqkv``, ``in_proj_weight``, ``query_key_value`` whose output axis is 3× the
input) are tagged ``p.optlab_fused_qkv = heads`` (1 for ``[Q; K; V]``, the head count for GPT-NeoX's per-head
interleaving): Muon then orthogonalizes Q, K and V separately.

User overrides are ``{regex: role}`` matched against the full parameter name with
``re.search``; the first matching pattern wins. A pattern that matches nothing warns.

Default grouping (nanoGPT's rule): weight decay on hidden matrices and the readout only.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["ROLES", "DECAYED_ROLES", "classify_parameters", "group_parameters", "readout_module_name", "validate_role",
           "conv1d_to_linear"]

#: every role, in the order groups are built
ROLES: tuple[str, ...] = ("embedding", "hidden", "readout", "norm", "bias")
#: roles that get weight decay by default
DECAYED_ROLES: frozenset[str] = frozenset({"hidden", "readout"})

_READOUT_NAMES = re.compile(r"^(lm_head|readout|output|head|unembed|output_layer|classifier)$")
_EMBEDDING_NAMES = re.compile(r"(^|\.)(wte|wpe|embed\w*|tok_embeddings|pos_emb\w*|position_embeddings|word_embeddings)(\.|$)")


def validate_role(role: str, where: str = "role") -> str:
    """Return ``role`` if it is one of :data:`ROLES`, else raise a ValueError listing them."""
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r} in {where}; roles are: {', '.join(ROLES)}")
    return role


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or "Norm" in type(module).__name__


def readout_module_name(model: nn.Module) -> str | None:
    """The qualified name of the module producing the logits, or None.

    Rules in order of priority, each over the whole model before the next: a module that names its
    readout (``optlab_readout``), then mup's ``MuReadout``, then a ``Linear`` named like a readout
    (``lm_head``, ``head``, ``output``, ...), then the last ``Linear`` with as many outputs as the
    token embedding has rows, then the last ``Linear``.
    """
    return _readout(model)[0]


def _readout(model: nn.Module) -> tuple[str | None, str | None]:
    """``(readout module name, None)`` when a rule named it, ``(name, why)`` when it is a guess."""
    modules = list(model.named_modules())
    for name, module in modules:
        # read it from the class or the instance itself, not through a wrapper's attribute
        # forwarding (torch.compile's OptimizedModule forwards to _orig_mod, which would name the
        # readout relative to the wrong module)
        explicit = getattr(type(module), "optlab_readout", None) or vars(module).get("optlab_readout")
        if isinstance(explicit, str):
            return (f"{name}.{explicit}" if name else explicit), None
    for name, module in modules:
        if type(module).__name__ == "MuReadout":
            return name, None
    linears = [(name, module) for name, module in modules if isinstance(module, nn.Linear)]
    for name, _ in linears:
        if _READOUT_NAMES.match(name.rsplit(".", 1)[-1]):
            return name, None
    vocab = {m.num_embeddings for _, m in modules if isinstance(m, nn.Embedding)}
    sized = [name for name, m in linears if m.out_features in vocab]
    if sized:
        return sized[-1], "the last nn.Linear with one output per token-embedding row"
    return (linears[-1][0], "the last nn.Linear of the model") if linears else (None, None)


#: layer classes whose 2-D parameters are ordinary weights (a bare nn.Parameter elsewhere is a guess)
_KNOWN_LAYERS = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Bilinear", "MultiheadAttention", "MuReadout",
                 "MuSharedReadout", "NonDynamicallyQuantizableLinear")


def _is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in_features, out_features)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2
            and w.shape[1] == getattr(module, "nf", None))


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every Hugging Face ``Conv1D`` of ``model`` by the equal ``nn.Linear`` (weight transposed), in place.

    ``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` of shape (nx, nf); ``nn.Linear(nx, nf)`` with weight
    ``Wᵀ`` computes the same. Optimizers that cut or scale a matrix by its rows (Adam-mini's blocks, Muon's
    shape factor) then see the usual (out_features, in_features) layout; GPT-2's fused ``c_attn`` becomes a
    ``[Q; K; V]`` row stack, which Adam-mini's ``qkv_pattern`` splits per head. Returns ``model``.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if _is_hf_conv1d(child):
                nx, nf = child.weight.shape
                lin = nn.Linear(nx, nf, bias=child.bias is not None, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, child_name, lin)
    return model


def classify_parameters(
    model: nn.Module, overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None
) -> "OrderedDict[str, str]":
    """Map every trainable parameter name of ``model`` to its role.

    Args:
        model: any ``nn.Module``.
        overrides: ``{regex: role}`` (or a list of pairs), searched in the full parameter name in
            order; the first match wins over the automatic rule.

    Example:
        >>> roles = classify_parameters(model, {r"\\.ln_f\\.": "norm"})
        >>> roles["lm_head.weight"]
        'readout'
    """
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or [])
    compiled = []
    for pattern, role in pairs:
        validate_role(role, f"role override {pattern!r}")
        try:
            compiled.append((re.compile(pattern), role, pattern))
        except re.error as err:
            raise ValueError(f"role override pattern {pattern!r} is not a valid regex: {err}") from None

    readout, readout_guess = _readout(model)
    owner: dict[int, tuple[str, nn.Module]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, module))
        if _is_hf_conv1d(module):
            module.weight.optlab_in_out = True  # type: ignore[attr-defined]  # read by Muon / Adam-mini
    _tag_fused_qkv(model)

    used: set[str] = set()
    roles: "OrderedDict[str, str]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = None
        for regex, r, pattern in compiled:
            if regex.search(name):
                role, _ = r, used.add(pattern)
                break
        if role is None:
            role, guess = _automatic_role(name, p, owner.get(id(p)), readout)
            if role == "readout" and readout_guess:
                guess = readout_guess
            if guess:
                warnings.warn(
                    f"parameter {name!r} got the role {role!r} by a guess ({guess}); name its role with role_patterns "
                    f"to confirm or correct it, e.g. OptimizerSpec(role_patterns={{{_pattern_for(name)!r}: {role!r}}}) "
                    f"(roles: {', '.join(ROLES)})",
                    stacklevel=2,
                )
        roles[name] = role
    for _, _, pattern in compiled:
        if pattern not in used:
            warnings.warn(
                f"role override pattern {pattern!r} matched no parameter; parameter names look like "
                f"{', '.join(list(roles)[:3])}",
                stacklevel=2,
            )
    return roles


#: fused attention projections: ``[Q; K; V]`` along the output axis, or per head (GPT-NeoX's query_key_value)
_FUSED_QKV = re.compile(r"(^|\.)(c_attn|qkv|qkv_proj|Wqkv|wqkv|in_proj)(\.weight|_weight)$")
_INTERLEAVED_QKV = re.compile(r"(^|\.)query_key_value\.weight$")


def _tag_fused_qkv(model: nn.Module) -> None:
    """Tag fused QKV weights ``p.optlab_fused_qkv = heads`` (1: ``[Q; K; V]``; h: h interleaved ``[q_i; k_i; v_i]``)
    for Muon, which then orthogonalizes Q, K and V separately. A 2-D weight named like one (``c_attn``, ``qkv``,
    ``qkv_proj``, ``Wqkv``, ``in_proj_weight``, ``query_key_value``) qualifies when its output axis (columns for
    HF's ``Conv1D``) is 3× its input axis; grouped-query layouts ((h + 2·h_kv)·d_head rows) are not 3× and are left
    alone."""
    # the (first) config in the tree: a LightningModule wrapping a Hugging Face model has none of its own
    heads = next((m.config.num_attention_heads for m in model.modules()
                  if isinstance(getattr(getattr(m, "config", None), "num_attention_heads", None), int)), None)
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        out, fan_in = (p.shape[1], p.shape[0]) if getattr(p, "optlab_in_out", False) else tuple(p.shape)
        if out != 3 * fan_in:
            continue
        if _FUSED_QKV.search(name):
            p.optlab_fused_qkv = 1  # type: ignore[attr-defined]
        elif _INTERLEAVED_QKV.search(name):
            if isinstance(heads, int) and heads > 0 and fan_in % heads == 0:
                p.optlab_fused_qkv = heads  # type: ignore[attr-defined]
            else:
                warnings.warn(
                    f"parameter {name!r} looks like a per-head interleaved fused QKV weight but the head count is unknown "
                    "(no model.config.num_attention_heads): Muon would orthogonalize Q, K and V together; set "
                    f"model.get_parameter({name!r}).optlab_fused_qkv = <number of heads> before configuring",
                    stacklevel=3,
                )


def _pattern_for(name: str) -> str:
    return "^" + re.escape(name) + "$"


def _automatic_role(name: str, p: torch.Tensor, owner: tuple[str, nn.Module] | None,
                    readout: str | None) -> tuple[str, str | None]:
    """``(role, None)`` by a sure rule, ``(role, why)`` by a guess."""
    mname, module = owner if owner is not None else ("", None)
    if module is not None and _is_norm(module):
        return "norm", None
    if module is not None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", None
    bare = p.ndim >= 2 and module is not None and type(module).__name__ not in _KNOWN_LAYERS
    if _EMBEDDING_NAMES.search(name) and p.ndim >= 2:
        return "embedding", ("a bare nn.Parameter named like an embedding or position table" if bare else None)
    if readout is not None and mname == readout and p.ndim >= 2:
        return "readout", None
    if p.ndim < 2:
        return "bias", None
    if bare:
        return "hidden", ("a bare nn.Parameter outside a known layer; a position table would be 'embedding'")
    return "hidden", None


def group_parameters(
    model: nn.Module,
    weight_decay: float = 0.0,
    *,
    roles: Mapping[str, str] | None = None,
    role_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    role_patterns: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups by role: ``[{"params", "param_names", "role", "weight_decay", ...}]``.

    Weight decay goes to hidden matrices and the readout only, unless ``role_overrides`` says
    otherwise (``{"embedding": {"weight_decay": 0.1}, "readout": {"lr": 1e-3}}``). Roles with no
    parameter produce no group.
    """
    if roles is None:
        roles = classify_parameters(model, role_patterns)
    overrides = dict(role_overrides or {})
    for role in overrides:
        validate_role(role, "role_overrides")
    named = dict(model.named_parameters())
    groups = []
    for role in ROLES:
        names = [n for n, r in roles.items() if r == role]
        if not names:
            continue
        group: dict[str, Any] = {
            "params": [named[n] for n in names],
            "param_names": names,
            "role": role,
            "weight_decay": weight_decay if role in DECAYED_ROLES else 0.0,
        }
        group.update(overrides.get(role, {}))
        groups.append(group)
    return groups
