"""Parameter roles, decided once for the configurator, μP and the callbacks.

Every parameter of an ``nn.Module`` gets one role:

* ``embedding`` — token or position embeddings (``nn.Embedding`` weights, parameters named
  like ``wte``/``wpe``/``embed_tokens``/``pos_emb``); a readout weight tied to an embedding is
  the same tensor and keeps the role ``embedding``;
* ``readout`` — the layer that produces the logits: a module the model names as such
  (an ``optlab_readout = "<submodule name>"`` attribute on any module, mup's ``MuReadout``, a module named ``lm_head``/``readout``/
  ``output``/``output_layer``/``head``/``unembed``/``classifier``), else the last ``nn.Linear`` registered in the module tree;
* ``norm`` — weights and biases of normalization layers (any module whose class name contains
  ``Norm``: LayerNorm, RMSNorm, GroupNorm, BatchNorm, ...);
* ``bias`` — other bias vectors and any other 0-/1-D parameter;
* ``hidden`` — every other matrix (and ≥ 2-D tensor).

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

__all__ = ["ROLES", "DECAYED_ROLES", "classify_parameters", "group_parameters", "readout_module_name", "validate_role"]

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
    (``lm_head``, ``head``, ``output``, ...), then the last ``Linear``.
    """
    modules = list(model.named_modules())
    for name, module in modules:
        # read it from the class or the instance itself, not through a wrapper's attribute
        # forwarding (torch.compile's OptimizedModule forwards to _orig_mod, which would name the
        # readout relative to the wrong module)
        explicit = getattr(type(module), "optlab_readout", None) or vars(module).get("optlab_readout")
        if isinstance(explicit, str):
            return f"{name}.{explicit}" if name else explicit
    for name, module in modules:
        if type(module).__name__ == "MuReadout":
            return name
    linears = [name for name, module in modules if isinstance(module, nn.Linear)]
    for name in linears:
        if _READOUT_NAMES.match(name.rsplit(".", 1)[-1]):
            return name
    return linears[-1] if linears else None


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

    readout = readout_module_name(model)
    owner: dict[int, tuple[str, nn.Module]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, module))

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
            role = _automatic_role(name, p, owner.get(id(p)), readout)
        roles[name] = role
    for _, _, pattern in compiled:
        if pattern not in used:
            warnings.warn(
                f"role override pattern {pattern!r} matched no parameter; parameter names look like "
                f"{', '.join(list(roles)[:3])}",
                stacklevel=2,
            )
    return roles


def _automatic_role(name: str, p: torch.Tensor, owner: tuple[str, nn.Module] | None, readout: str | None) -> str:
    mname, module = owner if owner is not None else ("", None)
    if module is not None and _is_norm(module):
        return "norm"
    if module is not None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if _EMBEDDING_NAMES.search(name) and p.ndim >= 2:
        return "embedding"
    if readout is not None and mname == readout and p.ndim >= 2:
        return "readout"
    if p.ndim < 2:
        return "bias"
    return "hidden"


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
