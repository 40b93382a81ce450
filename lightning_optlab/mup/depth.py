"""Transfer across depth: depth-μP and CompleteP, relative to the proxy's depth.

μP (Tensor Programs V) fixes how hyperparameters scale with width. Two parametrizations extend it
to depth for residual networks, both by a multiplier on every residual branch,
``x + (L_base / L)^α · f(x)``, with the per-layer learning rate, ε and weight decay corrected so
that every block's contribution to the feature updates stays of the same order as L grows:

* ``depth_mup``, α = 1/2: Yang, Yu, Zhu & Hayou 2023, "Tensor Programs VI: Feature Learning in
  Infinite-Depth Neural Networks" (arXiv 2310.02244); Bordelon, Noci, Li, Hanin & Pehlevan 2023,
  "Depthwise Hyperparameter Transfer in Residual Networks" (arXiv 2309.16620);
* ``completep``, α = 1: Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
  transformers" (arXiv 2505.01618), whose Table 1 gives the Adam-like corrections used here.

With m_L = L / L_base and a parameter inside a residual branch (every parameter of
``blocks.*``: the branch matrices, their norms and biases), the corrections multiply the width
rule's values:

=====================  =====================  ================  ======================
update kind            learning rate          weight decay      ε (the optimizer's own)
=====================  =====================  ================  ======================
scale-invariant        m_L^(α−1)              m_L^(1−α)         m_L^(−α)
sgd                    m_L^(2α−1)             m_L^(1−2α)        unchanged
=====================  =====================  ================  ======================

*Scale-invariant* updates do not grow with the gradient: Adam and its relatives (Adafactor,
Adam-mini, Adalayer, Adagrad, Schedule-Free), the sign methods (Lion, Signum), Sophia's clipped
ratio, SOAP (Adam in an eigenbasis), Shampoo with an Adam/Adagrad/RMSprop graft, and Muon's
orthogonalized step. A branch scaled by L^−α then moves the residual stream by η·L^−α per block,
L blocks add up to η·L^(1−α), hence η·m_L^(α−1) (CompleteP's Table 1 for Adam; derived the same way
for the others, and checked by the depth coordinate check). Weight decay keeps η·λ, as the width
rules do. The gradient of a branch parameter shrinks like L^−α, so ε, which sits beside the
gradient's size, follows it (CompleteP's ε rule). For SGD the update itself carries the gradient's
L^−α, so a block moves the stream by η·L^−2α and η·m_L^(2α−1) keeps the sum fixed (Tensor
Programs VI: for α = 1/2 SGD's learning rate is depth-independent).

The residual-branch init is the proxy's (``residual_init_layers`` = L_base), so the multiplier alone
carries the depth dependence; at the proxy's depth every rule is the plain μP model exactly.
Embeddings, the final norm and the readout are not in a branch and keep the width rule only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from torch import nn

__all__ = [
    "DEPTH_RULES", "DEPTH_KINDS", "depth_alpha", "check_depth_rule", "depth_config", "tag_depth",
    "depth_multipliers", "depth_state", "check_depth_state", "branch_multiplier",
]

#: depth rule -> α of the branch multiplier (L_base / L)^α; "none" is width-only μP
DEPTH_RULES: dict[str, float | None] = {"none": None, "depth_mup": 0.5, "completep": 1.0}

#: μP rule family -> how its update scales with the gradient (what decides the depth correction)
DEPTH_KINDS: dict[str, str] = {
    "adam": "scale_invariant", "sign": "scale_invariant", "sophia": "scale_invariant",
    "soap": "scale_invariant", "muon": "scale_invariant", "sgd": "sgd",
}

#: the attribute carrying ``(rule, m_L)`` on every parameter inside a residual branch
ATTR = "optlab_depth"


def check_depth_rule(rule: Any) -> str:
    """``rule`` if it names a depth rule (None means "none"), else a ValueError listing them."""
    rule = "none" if rule is None else rule
    if rule not in DEPTH_RULES:
        raise ValueError(f"depth must be one of {', '.join(map(repr, DEPTH_RULES))} (μP's depth rule), got {rule!r}")
    return rule


def depth_alpha(rule: str) -> float | None:
    return DEPTH_RULES[check_depth_rule(rule)]


def branch_multiplier(rule: str, depth: int, base_depth: int) -> float:
    """(L_base / L)^α: the factor on every residual branch (1 for "none" and at the base depth)."""
    alpha = depth_alpha(rule)
    return 1.0 if alpha is None or depth == base_depth else (base_depth / depth) ** alpha


def _check_depths(depth: int, base_depth: Any) -> int:
    if isinstance(base_depth, bool) or not isinstance(base_depth, int) or base_depth < 1:
        raise ValueError(f"base_depth must be the proxy's number of layers (an integer ≥ 1), got {base_depth!r}")
    return base_depth


def depth_config(config: Any, rule: str, base_depth: int) -> Any:
    """``config`` (a μP config) with the depth rule's branch multiplier and the proxy's residual init.

    The multiplier composes with the proxy's own ``residual_scale``; with ``rule="none"`` the config
    is returned unchanged (width-only μP, the plain GPT-2 init scaled by the target's depth)."""
    rule = check_depth_rule(rule)
    if rule == "none":
        return config
    base_depth = _check_depths(config.n_layer, base_depth)
    scale = float(config.residual_scale) * branch_multiplier(rule, config.n_layer, base_depth)
    return dataclasses.replace(config, residual_scale=scale, residual_init_layers=base_depth)


def branch_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters inside residual branches: every parameter under a module list of blocks
    (``blocks``, or the model's ``optlab_residual_blocks()`` when it declares one)."""
    declared = getattr(model, "optlab_residual_blocks", None)
    blocks = declared() if callable(declared) else getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` and no optlab_residual_blocks(): a depth rule "
                         "needs to know which parameters sit in residual branches")
    inside = {id(p) for b in blocks for p in b.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in inside]


def tag_depth(model: nn.Module, rule: str, base_depth: int, depth: int | None = None) -> nn.Module:
    """Put ``p.optlab_depth = (rule, m_L)`` on every residual-branch parameter (read by the group rewrite).

    ``depth`` defaults to ``model.config.n_layer``. With ``rule="none"`` nothing is tagged."""
    rule = check_depth_rule(rule)
    if rule == "none":
        return model
    depth = depth if depth is not None else model.config.n_layer
    base_depth = _check_depths(depth, base_depth)
    for _, p in branch_parameters(model):
        setattr(p, ATTR, (rule, depth / base_depth))
    model.optlab_mup_depth = {"rule": rule, "base_depth": base_depth, "depth": depth}  # type: ignore[assignment]
    return model


def depth_multipliers(family: str, param: Any, name: str = "") -> dict[str, float]:
    """``{"lr", "weight_decay", "eps"}`` factors of the depth rule tagged on ``param`` (all 1 when none)."""
    tag = getattr(param, ATTR, None)
    if tag is None:
        return {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}
    rule, m = tag
    alpha = depth_alpha(rule)
    kind = DEPTH_KINDS.get(family)
    if kind is None:
        raise ValueError(
            f"the μP family {family!r} of {name or 'a parameter'} has no depth rule (known: "
            f"{', '.join(sorted(DEPTH_KINDS))}); use depth='none' (width-only μP), or register the family's update "
            "kind in lightning_optlab.mup.depth.DEPTH_KINDS ('scale_invariant' or 'sgd')")
    if alpha is None or m == 1.0:
        return {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}
    if kind == "sgd":
        lr = m ** (2 * alpha - 1)
        return {"lr": lr, "weight_decay": 1.0 / lr, "eps": 1.0}
    lr = m ** (alpha - 1)
    return {"lr": lr, "weight_decay": 1.0 / lr, "eps": m ** (-alpha)}


def depth_state(model: nn.Module) -> dict[str, Any] | None:
    """The depth setting as plain data for a checkpoint (None without a depth rule)."""
    return dict(getattr(model, "optlab_mup_depth", None) or {}) or None


def check_depth_state(model: nn.Module, saved: Mapping[str, Any] | None) -> None:
    """Raise when a checkpoint's depth rule (or its base depth) differs from the model's."""
    mine = depth_state(model)
    if (saved or None) == mine:
        return
    def show(x: Any) -> str:
        return "none (width-only μP)" if not x else f"{x['rule']} from base depth {x['base_depth']} to {x['depth']}"
    raise ValueError(
        f"the checkpoint was trained with μP depth rule {show(saved)}, but this model has {show(mine)}; the "
        "branch multipliers and per-group learning rates would differ: resume with the checkpoint's "
        "mup: {depth: ..., base_depth: ...}")


def describe(rule: str, depth: int, base_depth: int) -> str:
    """One line for reports: the rule, the depths, the branch multiplier and the Adam-like η factor."""
    alpha = depth_alpha(rule)
    if alpha is None:
        return "depth rule: none (width-only μP)"
    m = depth / base_depth
    return (f"depth rule: {rule} (α = {alpha:g}), {base_depth} → {depth} layers: branch multiplier "
            f"{branch_multiplier(rule, depth, base_depth):.4g}, branch η ×{m ** (alpha - 1):.4g} (scale-invariant) / "
            f"×{m ** (2 * alpha - 1):.4g} (SGD), ε ×{m ** -alpha:.4g}" + ("" if not math.isclose(m, 1.0) else " (identity)"))
