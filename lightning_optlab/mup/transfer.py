"""Proxy → target transfer: the tuned proxy recipe becomes the target recipe with the same numbers under μP.

A *recipe* here is a mapping with a model and an optimizer, in one of these layouts:

* the pack's recipes (``recipes/*.yaml``): ``{"model": {"model": <preset | mapping>, ...CausalLMModule
  arguments}, "optimizer": {OptimizerSpec fields}, ...}``;
* LightningCLI's: ``{"model": {"class_path": ..., "init_args": {"model": ..., "optimizer": {...}}}}``;
* flat: ``{"model": <preset | mapping>, "optimizer": {...}}``.

The target recipe is the proxy recipe with the model replaced by the target, ``optimizer.mup: true``
and ``mup: {base: <proxy config>}`` among the module's arguments (``CausalLMModule(mup=...)``), so the
base shapes are recomputed from the config at every start; :func:`transfer` also returns them as plain
data for a file beside the recipe. A ``scales:`` section (the pack's tiny/paper variants) is dropped:
its models are not the target.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any, Mapping

import torch

from ..models import resolve_config
from .shapes import base_config, base_shapes_state, build_mup_model

__all__ = ["find_model_and_optimizer", "transfer", "NOT_TRANSFERRED", "DEPTH_NOT_TRANSFERRED"]

#: what μP does not carry from the proxy to the target (printed with every transfer)
NOT_TRANSFERRED = (
    "batch size and the number of steps/tokens (μP transfers across width, not across data or batch scale; "
    "re-tune or scale them by a scaling law)",
    "warmup length and schedule shape are copied as given, not derived",
    "context length and vocabulary must match the tuned setting for the numbers to carry over",
)


#: model fields that are hyperparameters tuned on the proxy rather than architecture (TP5 tunes the
#: initialization scale and the output multiplier beside the learning rate): the target takes the
#: proxy's value unless the target names its own; μP then rescales them per width itself
TUNED_MODEL_FIELDS = ("init_std", "logit_scale", "z_loss", "dropout")


#: printed instead of the depth rule's line when the transfer applies none
DEPTH_NOT_TRANSFERRED = (
    "depth: without a depth rule μP transfers across width only; a target deeper than the proxy is outside its "
    "guarantee (fix: --depth completep, or mup: {depth: completep} in the proxy recipe; see docs/mup.md)")


def find_model_and_optimizer(recipe: Mapping[str, Any]) -> tuple[Any, Any, list[str]]:
    """``(model spec, optimizer block, path of the mapping that takes the module arguments)``."""
    if not isinstance(recipe, Mapping):
        raise ValueError(f"a recipe must be a mapping (a YAML document), got {type(recipe).__name__}")
    model = recipe.get("model")
    if _is_class_spec(model) and isinstance(model.get("init_args"), Mapping):
        args = model["init_args"]
        if "model" in args and "optimizer" in args:
            return args["model"], args["optimizer"], ["model", "init_args"]
    if "optimizer" in recipe and isinstance(model, Mapping) and "model" in model:
        return model["model"], recipe["optimizer"], ["model"]
    if "optimizer" in recipe and model is not None:
        return model, recipe["optimizer"], []
    raise ValueError(
        "the proxy recipe names no model and optimizer: give `model: {model: {preset: ...}}` and `optimizer: {...}` "
        "(the pack's recipes), or LightningCLI's `model: {class_path: ..., init_args: {model: ..., optimizer: {...}}}`"
    )


def _is_class_spec(x: Any) -> bool:
    return isinstance(x, Mapping) and "class_path" in x


def _optimizer_fields(opt: Any) -> dict[str, Any]:
    if _is_class_spec(opt):
        opt = opt.get("init_args", {})
    if not isinstance(opt, Mapping):
        raise ValueError(f"the recipe's optimizer must be a mapping of OptimizerSpec fields, got {opt!r}")
    return dict(opt)


def recipe_depth_rule(recipe: Mapping[str, Any]) -> str:
    """The depth rule a recipe's module arguments ask for (``mup: {depth: ...}``), "none" if none."""
    from .depth import check_depth_rule

    try:
        _, _, path = find_model_and_optimizer(recipe)
    except ValueError:
        return "none"
    holder: Any = recipe
    for key in path:
        holder = holder.get(key, {}) if isinstance(holder, Mapping) else {}
    mup = holder.get("mup") if isinstance(holder, Mapping) else None
    return check_depth_rule(mup.get("depth")) if isinstance(mup, Mapping) else "none"


def transfer(
    proxy_recipe: Mapping[str, Any], target: str | Mapping[str, Any], *, target_overrides: Mapping[str, Any] | None = None,
    depth: str | None = None,
) -> dict[str, Any]:
    """Write the target recipe from a tuned proxy recipe.

    Args:
        proxy_recipe: the recipe the hyperparameters were tuned with (see the module doc).
        target: the target model (preset name or mapping), e.g. ``"llama-2.7b"``.
        target_overrides: target config fields (e.g. the proxy's ``vocab_size``).
        depth: the depth rule (``none``, ``depth_mup``, ``completep``; :mod:`.depth`), relative to the
            proxy's depth; default: the one the proxy recipe's ``mup: {depth: ...}`` asks for, else none.

    Returns:
        ``{"recipe": target recipe, "base_shapes": {name: base shape}, "width_mults": {role: [multipliers]},
        "role_lrs": [(optimizer, role, lr, weight decay, n parameters)], "notes": [...]}``.

    Raises:
        ValueError: the proxy is wider than the target, their architectures differ in more than
            width and depth, or the optimizer has no μP rule.
    """
    from ..configure import OptimizerSpec, plan_param_groups

    proxy_model, proxy_opt, path = find_model_and_optimizer(proxy_recipe)
    proxy_cfg = resolve_config(proxy_model)
    overrides = dict(target_overrides or {})
    target_cfg = resolve_config(target)
    if "vocab_size" not in overrides and target_cfg.vocab_size != proxy_cfg.vocab_size:
        overrides["vocab_size"] = proxy_cfg.vocab_size  # the tokenizer is part of the tuned setting
    named = set(target) if isinstance(target, Mapping) else set()
    carried = []
    for field in TUNED_MODEL_FIELDS:  # tuned on the proxy: carried, unless the target sets it itself
        if field not in overrides and field not in named and getattr(target_cfg, field) != getattr(proxy_cfg, field):
            carried.append(f"{field} {getattr(proxy_cfg, field)!r} (the target preset has {getattr(target_cfg, field)!r})")
            overrides[field] = getattr(proxy_cfg, field)
    target_cfg = resolve_config(target, **overrides)
    base = base_config(target_cfg, proxy_cfg)  # checks the architectures and the widths
    opt_fields = _optimizer_fields(proxy_opt)
    opt_fields["mup"] = True
    for key in ("schedule", "warmup_steps", "total_steps", "min_lr_ratio", "decay_fraction"):
        opt_fields.pop(key, None)  # the schedule does not change the per-group peak values printed here
    spec = OptimizerSpec(**opt_fields)
    from .depth import branch_multiplier, check_depth_rule, describe

    rule = check_depth_rule(depth if depth is not None else recipe_depth_rule(proxy_recipe))
    with torch.device("meta"):
        model = build_mup_model(target_cfg, base=proxy_cfg, depth=rule, base_depth=proxy_cfg.n_layer)
    plan = plan_param_groups(model, spec)
    role_lrs = []
    width_mults: dict[str, set[float]] = defaultdict(set)
    depth_mults: dict[str, set[float]] = defaultdict(set)  # the depth rule's η factor per role
    for _, name, groups, _ in plan:
        for g in groups:
            role_lrs.append((name, g["role"], float(g["lr"]), float(g["weight_decay"]), len(g["params"])))
            depth_mults[g["role"]].add(round(float(g.get("mup_depth_lr_mult", 1.0)), 6))
            for p in g["params"]:
                width_mults[g["role"]].add(round(float(p.infshape.width_mult()), 6))
    notes = list(NOT_TRANSFERRED)
    if carried:
        notes.insert(0, "taken from the proxy, where they were tuned: " + ", ".join(carried))
    if rule == "none":
        notes.insert(0, DEPTH_NOT_TRANSFERRED)
        if target_cfg.n_layer > proxy_cfg.n_layer:
            notes.insert(0, f"WARNING: the target is deeper than the proxy ({proxy_cfg.n_layer} → {target_cfg.n_layer} "
                            "layers) and no depth rule is applied: the learning rates are transferred across width "
                            "only. Fix: --depth completep (or depth_mup)")
    if target_cfg.head_dim != proxy_cfg.head_dim:
        ratio = (target_cfg.head_dim / proxy_cfg.head_dim) ** 0.5
        notes.insert(0, f"NOTE: the head size changes from {proxy_cfg.head_dim} to {target_cfg.head_dim}: μP's 1/d attention "
                        f"scale makes the target's attention logits {ratio:.3g}x smaller than 1/sqrt(d) would; at small "
                        "scale that was the main reason μP's wider models trained worse than SP's (docs/mup.md, 'Does the "
                        "μP model get better with width?'). Fix: keep the head size, a proxy with n_head = proxy width / "
                        f"{target_cfg.head_dim} or a target with n_head = target width / {proxy_cfg.head_dim}")
    depth_info = {"rule": rule, "base_depth": proxy_cfg.n_layer, "depth": target_cfg.n_layer,
                  "branch_multiplier": branch_multiplier(rule, target_cfg.n_layer, proxy_cfg.n_layer),
                  "summary": describe(rule, target_cfg.n_layer, proxy_cfg.n_layer),
                  "lr_mults": {r: sorted(v) for r, v in depth_mults.items()}}
    if isinstance(target, str):
        target_spec: Any = {"preset": target, **overrides}
    elif isinstance(target, Mapping):
        target_spec = {**target, **overrides}
    else:
        target_spec = _config_mapping(target_cfg)
    new_opt = copy.deepcopy(proxy_opt)
    (new_opt.setdefault("init_args", {}) if _is_class_spec(new_opt) else new_opt)["mup"] = True
    recipe = copy.deepcopy(dict(proxy_recipe))
    recipe.pop("scales", None)
    recipe.pop("sweep", None)  # the proxy's tuning grid, not the target's
    if path == ["model", "init_args"]:
        holder = recipe["model"]["init_args"]
        holder["optimizer"] = new_opt
    else:
        recipe["optimizer"] = new_opt
        if path == ["model"]:
            holder = recipe["model"]
        else:
            recipe["model"] = {}
            holder = recipe["model"]
    holder["model"] = target_spec
    holder["mup"] = {"base": _config_mapping(proxy_cfg)}
    if rule != "none":
        holder["mup"].update(depth=rule, base_depth=proxy_cfg.n_layer)
    return {
        "recipe": recipe,
        "base_shapes": base_shapes_state(model),
        "width_mults": {r: sorted(v) for r, v in width_mults.items()},
        "role_lrs": role_lrs,
        "notes": notes,
        "depth": depth_info,
        "proxy": proxy_cfg,
        "target": target_cfg,
        "base": base,
    }


def _config_mapping(cfg: Any) -> dict[str, Any]:
    """A config as a ``{"family": ..., **fields}`` mapping that ``build_model`` accepts (YAML-safe)."""
    from ..models import LlamaConfig

    out = {"family": "llama" if isinstance(cfg, LlamaConfig) else "gpt2"}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = float(v) if isinstance(v, float) else v
    return out
