"""Per-family μP rules, applied as a rewrite of parameter groups by role and width multiplier.

Notation (mup's ``InfShape``): a parameter is *matrix-like* when two of its dimensions grow with
width (hidden matrices), *vector-like* when one does (embeddings, the readout, norm weights,
biases). ``m_in``/``m_out`` are the fan-in/fan-out width multipliers (width / base width), ``m``
a vector-like parameter's multiplier. The learning rate, weight decay and ε given to the
optimizer are the values tuned on the base (proxy) model; at the base width every rule is the
identity.

====================  ==========================================================================
family                rule (matrix-like; vector-like parameters unchanged unless said)
====================  ==========================================================================
adam (AdamW,          η/m_in, λ·m_in (η·λ unchanged, as mup's ``MuAdamW``), ε/m_in;
Adafactor, Adam-mini,  readout through the model's 1/m logit multiplier (Yang et al. 2022,
Adalayer, Adagrad,     "Tensor Programs V", Table 3; ε: Everett et al. 2024, arXiv 2407.05872 —
Schedule-Free AdamW)   gradients shrink like 1/m_in, so a fixed ε would grow relative to them)
sign (Lion, Signum)   η/m_in, λ·m_in: a sign update has entries of size 1 like Adam's
sophia                η/m_in, λ·m_in: the clipped update is entrywise bounded like Adam's
                      (μP validated for Lion and Sophia by Schlotthauer et al. 2025, arXiv 2507.08472)
soap                  hidden matrices: the Adam rule (η/m_in, λ·m_in, ε/m_in): Adam run in the
                      orthonormal eigenbasis of the Kronecker factors keeps Adam's entry size when
                      the factors are full rank, as they are with many tokens per step. Readout:
                      η·sqrt(m), λ/sqrt(m): its gradient δhᵀ is low-rank in the width direction,
                      and Adam in the eigenbasis of hhᵀ gives an update aligned with h/|h|, not
                      with sign(h), so the logit change is ∝ η·sqrt(width)/width instead of
                      Adam's η·width/width. Derived here; both checked by the coordinate check
                      (with η unscaled the logits shrink 5x from width 32 to 256; with η·sqrt(m)
                      they stay within 1.5x)
shampoo               grafting "adam"/"adagrad"/"rmsprop": the Adam rule (the graft sets the
                      update's norm); grafting "sgd": the SGD rule; "none": no rule (error)
sgd                   mup's ``MuSGD``: matrix η·m_out/m_in, λ·m_in/m_out; vector η·m, λ/m
muon                  spectral scaling (Yang, Simon & Bernstein 2023; Large et al. 2024): the
                      update's spectral norm should be ∝ sqrt(fan_out/fan_in); Muon's step is
                      η·s·O with ‖O‖₂ = 1 and s = Muon's own shape scale, so
                      η ← η · sqrt(m_out/m_in) · s(base shape)/s(shape), λ ← λ/that (η·λ kept).
                      "original" scale: η unchanged for a fixed aspect ratio; "rms_match"
                      (0.2·sqrt(max dim)): η/sqrt(m). Muon takes hidden matrices only.
====================  ==========================================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from .._extras import require

require("mup")  # a one-line install hint when it is missing
from mup.infshape import InfShape  # noqa: E402

from ..optim.muon import SCALES, muon_scale
from ..optim.registry import get_optimizer_class
from .depth import depth_multipliers
from .shapes import require_base_shapes

__all__ = ["RULES", "mup_family", "mup_multipliers", "apply_mup_to_groups"]


def mup_family(name: str, hparams: Mapping[str, Any]) -> str:
    """The rule family optimizer ``name`` declares (its class's ``mup_family_for(hparams)``); raises if none."""
    cls = get_optimizer_class(name)
    family_for = getattr(cls, "mup_family_for", None)
    if family_for is None:
        raise ValueError(
            f"optimizer {name!r} declares no μP rule (it does not derive from lightning_optlab.optim.OptlabOptimizer); "
            "turn mup off for it, or route its roles to another optimizer with a mix part"
        )
    family = family_for(hparams)
    if family not in RULES:
        raise ValueError(f"optimizer {name!r} declares the μP family {family!r}; known families: {', '.join(sorted(RULES))}")
    return family


def _unchanged() -> dict[str, float]:
    return {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}


def _adam_rule(name: str, shape: InfShape, hparams: Mapping[str, Any], role: str) -> dict[str, float]:
    """Adam-like entrywise-bounded updates: matrix-like η/m_in, λ·m_in, ε/m_in; vector-like unchanged."""
    if shape.ninf() < 2:
        return _unchanged()
    m_in = shape[1].width_mult()
    return {"lr": 1.0 / m_in, "weight_decay": m_in, "eps": 1.0 / m_in}


def _eigen_adam_rule(name: str, shape: InfShape, hparams: Mapping[str, Any], role: str) -> dict[str, float]:
    """SOAP: the Adam rule, except the readout: η·sqrt(m), λ/sqrt(m) (see the module table)."""
    if role == "readout" and shape.ninf() == 1:
        k = math.sqrt(shape.width_mult())
        return {"lr": k, "weight_decay": 1.0 / k, "eps": 1.0}
    return _adam_rule(name, shape, hparams, role)


def _sgd_rule(name: str, shape: InfShape, hparams: Mapping[str, Any], role: str) -> dict[str, float]:
    """mup's MuSGD: matrix η·m_out/m_in, λ·m_in/m_out; vector η·m, λ/m."""
    if shape.ninf() < 2:
        m = shape.width_mult()
        return {"lr": m, "weight_decay": 1.0 / m, "eps": 1.0}
    ratio = shape.fanin_fanout_mult_ratio()
    return {"lr": 1.0 / ratio, "weight_decay": ratio, "eps": 1.0}


def _spectral_rule(name: str, shape: InfShape, hparams: Mapping[str, Any], role: str) -> dict[str, float]:
    """Muon: η·sqrt(m_out/m_in)·s(base shape)/s(shape), λ divided by the same factor."""
    if shape.ninf() < 2 or len(shape) != 2:
        raise ValueError(
            f"Muon's μP rule covers hidden matrices only, but {name} (role {role or '?'}) has "
            f"{shape.ninf()} width dimension(s); route embeddings, readout, norms and biases to AdamW with a mix part"
        )
    fan_in, fan_out = shape[1], shape[0]
    adjust = hparams.get("adjust_lr_fn") or SCALES[hparams.get("scale", "rms_match")]
    s_ratio = muon_scale(adjust, fan_out.base_dim, fan_in.base_dim) / muon_scale(adjust, fan_out.dim, fan_in.dim)
    lr = math.sqrt(fan_out.width_mult() / fan_in.width_mult()) * s_ratio
    return {"lr": lr, "weight_decay": 1.0 / lr, "eps": 1.0}


#: μP rule family -> rule(parameter name, InfShape, hparams, role) -> {"lr", "weight_decay", "eps"} multipliers
RULES: dict[str, Callable[[str, InfShape, Mapping[str, Any], str], dict[str, float]]] = {
    "adam": _adam_rule,
    "sign": _adam_rule,
    "sophia": _adam_rule,
    "soap": _eigen_adam_rule,
    "sgd": _sgd_rule,
    "muon": _spectral_rule,
}


def mup_multipliers(family: str, name: str, shape: InfShape, hparams: Mapping[str, Any], role: str = "") -> dict[str, float]:
    """``{"lr": ×, "weight_decay": ×, "eps": ×}`` for one parameter (see the module table)."""
    ninf = shape.ninf()
    if ninf > 2:
        raise ValueError(f"μP rules cover tensors with at most two width dimensions; {name} has {ninf}")
    rule = RULES.get(family)
    if rule is None:
        raise ValueError(f"unknown μP rule family {family!r}; known: {', '.join(sorted(RULES))}")
    return rule(name, shape, hparams, role)


def apply_mup_to_groups(
    name: str, groups: list[dict[str, Any]], defaults: Mapping[str, Any],
    *, base_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Rewrite param groups for μP: split each group by multiplier and scale lr, weight decay, ε.

    Args:
        name: canonical optimizer name (the family its class declares decides the rule; the group
            keys its traits list in ``mup_eps_keys`` are scaled like ε).
        groups: ``group_parameters``-style groups (``params``, ``param_names``, ``role``, ...).
        defaults: the optimizer's effective constructor settings (``lr``, ``eps``, ``grafting``...)
            for the keys a group does not set.
        base_lr: the spec's base learning rate (for the ``mup_lr_ratio`` the LR finder reads).

    A parameter tagged by a depth rule (``p.optlab_depth``, see :mod:`.depth`) gets the depth
    correction on top of the width rule. Each output group carries ``mup_lr_mult`` (its η multiplier) and ``mup_lr_ratio`` (its η over
    the spec's base η, which also includes per-role overrides) so an LR finder can move every group
    together; parameters whose multipliers are equal stay in one group.
    """
    family = mup_family(name, defaults)
    traits = getattr(get_optimizer_class(name), "traits", None)
    eps_keys = traits.mup_eps_keys if traits is not None else ()
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        names = list(group.get("param_names", [str(i) for i in range(len(params))]))
        require_base_shapes(zip(names, params))
        buckets: dict[tuple[float, float, float, float], list[int]] = {}
        for i, p in enumerate(params):
            mult = mup_multipliers(family, names[i], p.infshape, {**defaults, **group}, group.get("role", ""))
            depth = depth_multipliers(family, p, names[i])  # 1s without a depth rule (see .depth)
            key = (*(mult[k] * depth[k] for k in ("lr", "weight_decay", "eps")), depth["lr"])
            buckets.setdefault(key, []).append(i)
        for (lr_m, wd_m, eps_m, depth_lr_m), idx in buckets.items():
            new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new["params"] = [params[i] for i in idx]
            new["param_names"] = [names[i] for i in idx]
            lr = group.get("lr", defaults["lr"])
            new["lr"] = lr * lr_m
            new["weight_decay"] = group.get("weight_decay", defaults.get("weight_decay", 0.0)) * wd_m
            for key in eps_keys:  # the keys the optimizer declares to scale like the gradient
                eps = group.get(key, defaults.get(key))
                if isinstance(eps, (int, float)) and eps_m != 1.0:
                    new[key] = eps * eps_m
            new["mup_lr_mult"] = lr_m
            if depth_lr_m != 1.0 or any(hasattr(params[i], "optlab_depth") for i in idx):
                new["mup_depth_lr_mult"] = depth_lr_m  # the depth rule's part of mup_lr_mult
            new["mup_lr_ratio"] = new["lr"] / base_lr if base_lr else lr_m
            out.append(new)
    return out

