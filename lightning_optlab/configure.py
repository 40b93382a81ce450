"""One way to ask for any optimizer: ``configure(module, "lion", lr=..., ...)`` or an ``OptimizerSpec``.

``configure`` returns what ``LightningModule.configure_optimizers`` returns: the optimizer and an
LR-scheduler dict stepping once per optimizer step. Parameters are grouped by role
(:mod:`lightning_optlab.params`): weight decay on hidden matrices and the readout only, per-role
overrides on top, and optionally a different algorithm per role (an :class:`OptimizerMix`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .optim._validate import check_betas, check_eps, check_lr, check_weight_decay
from .optim.base import iter_leaf_optimizers, optimizer_traits
from .optim.mix import OptimizerMix
from .optim.registry import canonical_name, get_optimizer_class
from .params import DECAYED_ROLES, classify_parameters, group_parameters, validate_role
from .schedules import ScheduleFactor, build_scheduler

__all__ = ["OptimizerSpec", "MixPart", "configure", "build_optimizer", "plan_param_groups"]

# Group-level keys a user may override per role; anything else must be an optimizer argument.
_GROUP_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum")


@dataclass(kw_only=True)
class MixPart:
    """A different algorithm for some parameter roles (the per-role optimizer mix)."""

    #: registered optimizer name, e.g. "adalayer"
    optimizer: str
    #: roles this algorithm takes, e.g. ["readout", "norm"]
    roles: list[str]
    #: learning rate for these roles (default: the spec's lr)
    lr: float | None = None
    #: betas for these roles (default: the spec's betas, when the algorithm takes betas)
    betas: tuple[float, float] | None = None
    #: eps for these roles (default: the spec's eps)
    eps: float | None = None
    #: weight decay for these roles' decayed groups (default: the spec's)
    weight_decay: float | None = None
    #: other constructor arguments of this algorithm
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.optimizer = canonical_name(self.optimizer)
        if isinstance(self.roles, str) or not isinstance(self.roles, (list, tuple)):
            raise ValueError(f"mix part {self.optimizer!r}: roles must be a list such as ['readout', 'norm'], got {self.roles!r}")
        self.hparams = _mapping("hparams", self.hparams)
        for key in ("lr", "eps", "weight_decay"):
            setattr(self, key, _number(f"mix part {self.optimizer!r}: {key}", getattr(self, key)))
        self.betas = _betas(self.betas)
        if not self.roles:
            raise ValueError(f"mix part {self.optimizer!r} lists no roles; give e.g. roles=['readout', 'norm']")
        for role in self.roles:
            validate_role(role, f"mix part {self.optimizer!r}")
        _check_common(self.lr, self.betas, self.eps, self.weight_decay)


@dataclass(kw_only=True)
class OptimizerSpec:
    """Everything that defines an optimizer run; LightningCLI fills it from YAML.

    Example (YAML)::

        optimizer:
          name: lion
          lr: 3.0e-4
          betas: [0.9, 0.99]
          weight_decay: 0.1
          schedule: cosine
          warmup_steps: 200
          total_steps: 10000
    """

    #: registered optimizer name or alias (see ``lightning_optlab.available_optimizers()``)
    name: str = "adamw"
    #: peak learning rate (≥ 0)
    lr: float = 1e-3
    #: (beta1, beta2) each in [0, 1); None keeps the optimizer's default. Signum and SGD take betas[0] as momentum.
    betas: tuple[float, float] | None = None
    #: epsilon (> 0); None keeps the optimizer's default
    eps: float | None = None
    #: weight decay on hidden matrices and the readout (≥ 0); decoupled for AdamW and the pack's
    #: optimizers, added to the gradient (L2) by torch's SGD and Adagrad, as torch defines them
    weight_decay: float = 0.0
    #: one of constant, linear, cosine, wsd
    schedule: str = "constant"
    #: linear warmup steps (≥ 0)
    warmup_steps: int = 0
    #: total optimizer steps (needed by linear, cosine, wsd)
    total_steps: int | None = None
    #: final LR as a fraction of the peak (the cosine floor), in [0, 1]
    min_lr_ratio: float = 0.0
    #: for wsd: the fraction of total_steps spent decaying, in (0, 1]
    decay_fraction: float = 0.1
    #: parameter-role overrides by name: {regex: role}; first match wins
    role_patterns: dict[str, str] = field(default_factory=dict)
    #: per-role group settings: {role: {"lr": ..., "weight_decay": ..., ...}}
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: other roles handled by other algorithms (the per-role mix)
    mix: list[MixPart] = field(default_factory=list)
    #: other constructor arguments of the optimizer (e.g. {"rho": 0.04} for Sophia)
    hparams: dict[str, Any] = field(default_factory=dict)
    #: μP: lr, weight decay and ε are the base (proxy) model's, rewritten per parameter by each
    #: algorithm's rule and width multiplier (``lightning_optlab.mup``); the model needs base shapes
    mup: bool = False
    #: under several ranks, optimizers that need whole tensors (SOAP, Shampoo, Muon, Adafactor,
    #: Adalayer): "owner" computes each parameter's update on one owner rank and shares it (needed
    #: under FSDP2; spreads the work under DDP), "replicate" computes every update on every rank
    #: (DDP only). See :mod:`lightning_optlab.optim.distributed`.
    distribute: str = "owner"

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        # Numbers from YAML may arrive as strings (PyYAML reads 3e-4, without a dot, as one)
        self.lr = _number("lr", self.lr, required=True)
        for key in ("eps", "weight_decay", "min_lr_ratio", "decay_fraction"):
            setattr(self, key, _number(key, getattr(self, key), required=key != "eps"))
        for key in ("warmup_steps", "total_steps"):
            setattr(self, key, _number(key, getattr(self, key), integer=True, required=key == "warmup_steps"))
        self.betas = _betas(self.betas)
        for key in ("role_patterns", "overrides", "hparams"):
            setattr(self, key, _mapping(key, getattr(self, key)))
        if not isinstance(self.mix, (list, tuple)):
            raise ValueError(f"mix must be a list of mix parts such as [{{'optimizer': 'adamw', 'roles': ['norm']}}], got {self.mix!r}")
        _check_common(self.lr, self.betas, self.eps, self.weight_decay)
        # Schedule settings are checked now, before any training starts.
        ScheduleFactor(self.schedule, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.decay_fraction)
        for pattern, role in self.role_patterns.items():
            validate_role(role, f"role_patterns[{pattern!r}]")
        for role, settings in self.overrides.items():
            validate_role(role, "overrides")
            if not isinstance(settings, Mapping):
                raise ValueError(f"overrides[{role!r}] must be a mapping such as {{'lr': 1e-3}}, got {settings!r}")
            unknown = set(settings) - set(_GROUP_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{role!r}] has unknown keys {sorted(unknown)}; allowed: {', '.join(_GROUP_KEYS)}. "
                    "To run another algorithm on a role use `mix`."
                )
            settings = self.overrides[role] = {
                k: (_betas(v) if k == "betas" else _number(f"overrides[{role!r}][{k!r}]", v)) for k, v in settings.items()
            }
            _check_common(settings.get("lr"), settings.get("betas"), settings.get("eps"), settings.get("weight_decay"))
        if optimizer_traits(get_optimizer_class(self.name)).replaces_schedule and self.schedule != "constant":
            raise ValueError(
                f"{self.name} replaces the LR schedule; got schedule={self.schedule!r}. "
                "Use schedule='constant' (warmup_steps is still applied)"
            )
        self.mix = [p if isinstance(p, MixPart) else MixPart(**p) for p in self.mix]
        if not isinstance(self.mup, bool):
            raise ValueError(f"mup must be true or false, got {self.mup!r}")
        from .optim.distributed import DISTRIBUTE_MODES

        if self.distribute not in DISTRIBUTE_MODES:
            raise ValueError(f"distribute must be one of {', '.join(map(repr, DISTRIBUTE_MODES))}, got {self.distribute!r}")
        if self.mup:
            from .mup.rules import mup_family  # only when μP is asked for

            mup_family(self.name, self.hparams)
            for part in self.mix:
                mup_family(part.optimizer, part.hparams)
        claimed: dict[str, str] = {}
        for part in self.mix:
            for role in part.roles:
                if role in claimed:
                    raise ValueError(
                        f"role {role!r} is given two algorithms ({claimed[role]!r} and {part.optimizer!r}); "
                        "list each role in at most one mix part"
                    )
                claimed[role] = part.optimizer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(name: str, value: Any, *, integer: bool = False, required: bool = False) -> Any:
    """``value`` as a number: numeric strings (as YAML may give) are converted; anything else that
    is not a number raises a ``ValueError`` naming it. ``None`` passes unless ``required``."""
    if value is None:
        if required:
            raise ValueError(f"{name} must be a number, got None")
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if integer:
        if float(value) != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return value


def _betas(betas: Any) -> Any:
    if betas is None:
        return None
    if isinstance(betas, str) or not isinstance(betas, (list, tuple)):
        raise ValueError(f"betas must be a pair such as [0.9, 0.95], got {betas!r}")
    return tuple(_number(f"betas[{i}]", b, required=True) for i, b in enumerate(betas))


def _mapping(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping (a dict, or a YAML block of key: value), got {value!r}")
    return dict(value)


def _check_common(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if lr is not None:
        check_lr(lr)
    if betas is not None:
        check_betas(betas)
    if eps is not None:
        check_eps(eps)
    if weight_decay is not None:
        check_weight_decay(weight_decay)


def _init_parameters(cls: type) -> tuple[str, ...]:
    """The constructor keywords of ``cls`` besides ``params``, as the class declares them
    (``OptlabOptimizer.constructor_arguments``)."""
    declared = getattr(cls, "constructor_arguments", None)
    if declared is None:
        raise TypeError(
            f"optimizer class {cls.__name__} does not declare its hyperparameters: derive it from "
            "lightning_optlab.optim.OptlabOptimizer with an HParams dataclass (see docs/optimizers.md, 'Adding an optimizer')"
        )
    return tuple(declared())


def _constructor_kwargs(cls: type, name: str, lr: float, betas: Any, eps: Any, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs for ``cls``, mapping betas to momentum for momentum-only methods."""
    params = _init_parameters(cls)
    kwargs: dict[str, Any] = {"lr": lr}
    if betas is not None:
        if "betas" in params:
            kwargs["betas"] = tuple(betas)
        elif "momentum" in params:
            kwargs["momentum"] = betas[0]
        else:
            raise ValueError(f"optimizer {name!r} takes no betas; remove betas from its spec")
    if eps is not None:
        if "eps" not in params:
            raise ValueError(f"optimizer {name!r} takes no eps; remove eps from its spec")
        kwargs["eps"] = eps
    kwargs.update(hparams)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        allowed = list(params)
        raise ValueError(f"optimizer {name!r} got unknown arguments {unknown}; it accepts: {', '.join(allowed)}")
    return kwargs


def check_constructor_arguments(spec: OptimizerSpec) -> None:
    """Raise the ``ValueError`` :func:`build_optimizer` would raise for arguments an optimizer does
    not take (a misspelled ``hparams`` key, betas for a method without them), without a model."""
    _constructor_kwargs(get_optimizer_class(spec.name), spec.name, spec.lr, spec.betas, spec.eps, spec.hparams)
    for part in spec.mix:
        _constructor_kwargs(get_optimizer_class(part.optimizer), part.optimizer, part.lr if part.lr is not None else spec.lr,
                            part.betas, part.eps, part.hparams)


def _model_of(module_or_model: Any) -> nn.Module:
    if isinstance(module_or_model, nn.Module):
        return module_or_model
    raise TypeError(f"configure needs an nn.Module or LightningModule, got {type(module_or_model).__name__}")


def build_optimizer(module_or_model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer (an :class:`OptimizerMix` when ``spec.mix`` is set) for ``spec``."""
    plan = plan_param_groups(module_or_model, spec, stacklevel=4)
    children = [cls(groups, **kwargs) for cls, _, groups, kwargs in plan]
    optimizer = children[0] if len(children) == 1 else OptimizerMix(children, names=[name for _, name, _, _ in plan])
    from .optim.distributed import set_distribution

    set_distribution(optimizer, spec.distribute)
    for child in children:  # sharded parameters that cannot be gathered: the error now, before training
        check = getattr(child, "distributor", None)
        if check is not None:
            check()
    return optimizer


def plan_param_groups(
    module_or_model: nn.Module, spec: OptimizerSpec, *, stacklevel: int = 3
) -> list[tuple[type, str, list[dict[str, Any]], dict[str, Any]]]:
    """``[(optimizer class, name, param groups, constructor kwargs)]``: what :func:`build_optimizer` builds.

    The groups are final (per-role overrides, mix-part settings and, with ``spec.mup``, μP's
    rewrite applied); nothing is constructed, so this also works on a model on the meta device.
    """
    model = _model_of(module_or_model)
    if spec.mup:  # μP learning rates only for a μP forward pass (the readout multiplier)
        from .mup.shapes import check_readout_multiplier

        check_readout_multiplier(model)
    roles = classify_parameters(model, spec.role_patterns)
    mixed_roles = {role: part for part in spec.mix for role in part.roles}
    for role in mixed_roles:
        if role not in roles.values():  # e.g. a recipe's "bias" on a model without biases
            warnings.warn(
                f"mix part {mixed_roles[role].optimizer!r} lists role {role!r}, but the model has no {role} parameters; "
                f"its roles are: {', '.join(sorted(set(roles.values())))}",
                stacklevel=stacklevel,
            )
    groups = group_parameters(model, spec.weight_decay, roles=roles, role_overrides=spec.overrides)
    main_groups = [g for g in groups if g["role"] not in mixed_roles]
    plan = []
    if main_groups:
        cls = get_optimizer_class(spec.name)
        kwargs = _constructor_kwargs(cls, spec.name, spec.lr, spec.betas, spec.eps, spec.hparams)
        _check_override_keys(spec.overrides, {g["role"] for g in main_groups}, cls, spec.name)
        if spec.mup:
            main_groups = _mup_groups(cls, spec.name, main_groups, kwargs, spec.lr)
        plan.append((cls, spec.name, _with_group_momentum(main_groups, kwargs), kwargs))
    for part in spec.mix:
        part_groups = [g for g in groups if g["role"] in part.roles]
        if not part_groups:
            continue
        if part.weight_decay is not None:
            for g in part_groups:  # the part's decay goes where decay goes by default, unless overridden
                if "weight_decay" not in spec.overrides.get(g["role"], {}):
                    g["weight_decay"] = part.weight_decay if g["role"] in DECAYED_ROLES else 0.0
        cls = get_optimizer_class(part.optimizer)
        # betas / eps are inherited only between algorithms that both take them in the same sense
        # (an SGD spec's betas[0] is its momentum and must not become an Adam part's betas).
        main_params = _init_parameters(get_optimizer_class(spec.name))
        part_params = _init_parameters(cls)
        inherit_betas = "betas" in main_params and "betas" in part_params
        betas = part.betas if part.betas is not None else (spec.betas if inherit_betas else None)
        eps = part.eps if part.eps is not None else (spec.eps if "eps" in main_params and "eps" in part_params else None)
        kwargs = _constructor_kwargs(cls, part.optimizer, part.lr if part.lr is not None else spec.lr, betas, eps, part.hparams)
        _check_override_keys(spec.overrides, set(part.roles), cls, part.optimizer)
        if spec.mup:
            part_groups = _mup_groups(cls, part.optimizer, part_groups, kwargs, spec.lr)
        plan.append((cls, part.optimizer, _with_group_momentum(part_groups, kwargs), kwargs))
    _name_groups(plan)
    return plan


def _name_groups(plan: list[tuple[type, str, list[dict[str, Any]], dict[str, Any]]]) -> None:
    """Give every group a unique ``name``, ``<role>/<optimizer>`` (``.1``, ``.2`` ... when μP splits a role
    by multiplier), so that Lightning's ``LearningRateMonitor`` logs ``lr/<name>`` instead of ``lr/pgN``."""
    seen: dict[str, int] = {}
    for _, opt_name, groups, _ in plan:
        for g in groups:
            base = f"{g.get('role', 'group')}/{opt_name}"
            seen[base] = seen.get(base, 0) + 1
    counts: dict[str, int] = {}
    for _, opt_name, groups, _ in plan:
        for g in groups:
            base = f"{g.get('role', 'group')}/{opt_name}"
            counts[base] = counts.get(base, 0) + 1
            g.setdefault("name", base if seen[base] == 1 else f"{base}.{counts[base]}")


def _check_override_keys(overrides: Mapping[str, Mapping[str, Any]], roles: set[str], cls: type, name: str) -> None:
    """A per-role override the role's optimizer would ignore (eps for Lion, momentum for AdamW) is an error."""
    params = _init_parameters(cls)
    for role in sorted(roles):
        for key in overrides.get(role, {}):
            takes = key in params or (key == "betas" and "momentum" in params)  # betas[0] is SGD's momentum
            if key not in ("lr", "weight_decay") and not takes:
                raise ValueError(
                    f"overrides[{role!r}] sets {key!r}, which optimizer {name!r} (it runs the {role} parameters) "
                    f"does not take; remove it, or give the {role} role to another algorithm through `mix`"
                )


def _mup_groups(cls: type, name: str, groups: list[dict[str, Any]], kwargs: Mapping[str, Any], base_lr: float) -> list[dict[str, Any]]:
    """μP's rewrite of ``groups`` (lr, weight decay, ε by role and width multiplier) for optimizer ``name``."""
    from .mup.rules import apply_mup_to_groups  # the mup package only when μP is asked for

    defaults = dict(cls.hparam_defaults())
    defaults.update(kwargs)
    return apply_mup_to_groups(name, groups, defaults, base_lr=base_lr)


def _with_group_momentum(groups: list[dict[str, Any]], kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    # A per-role "betas" override on a momentum-only method means its momentum.
    out = []
    for g in groups:
        g = dict(g)
        if "betas" in g and "betas" not in kwargs and "momentum" in kwargs:
            g["momentum"] = g.pop("betas")[0]
        out.append(g)
    return out


def configure(module_or_model: nn.Module, name: str | OptimizerSpec = "adamw", **hparams: Any) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: ``{"optimizer": ..., "lr_scheduler": {...}}``.

    Args:
        module_or_model: the LightningModule (or any ``nn.Module``) whose parameters to optimize.
        name: an optimizer name (``"lion"``, ``"soap"``, ...) or a full :class:`OptimizerSpec`.
        **hparams: :class:`OptimizerSpec` fields (lr, betas, eps, weight_decay, schedule, warmup_steps,
            total_steps, min_lr_ratio, decay_fraction, role_patterns, overrides, mix); any other keyword is
            passed to the optimizer's constructor (e.g. ``momentum=0.98`` for SGD, ``rho=0.04`` for Sophia).

    Example:
        >>> def configure_optimizers(self):
        ...     return configure(self, "lion", lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1,
        ...                      schedule="cosine", warmup_steps=200, total_steps=10_000)
    """
    if isinstance(name, OptimizerSpec):
        if hparams:
            raise ValueError(f"pass either an OptimizerSpec or keyword arguments, not both (got {sorted(hparams)})")
        spec = name
    else:
        spec_fields = set(OptimizerSpec.__dataclass_fields__)
        extra = {k: v for k, v in hparams.items() if k not in spec_fields}
        given = {k: v for k, v in hparams.items() if k in spec_fields}
        if extra:
            given["hparams"] = {**given.get("hparams", {}), **extra}
        spec = OptimizerSpec(name=name, **given)
    optimizer = build_optimizer(module_or_model, spec)
    scheduler = build_scheduler(
        optimizer,
        spec.schedule,
        warmup_steps=spec.warmup_steps,
        total_steps=spec.total_steps,
        min_lr_ratio=spec.min_lr_ratio,
        decay_fraction=spec.decay_fraction,
    )
    _attach_mode_switch(module_or_model, optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}


def _attach_mode_switch(module: Any, optimizer: torch.optim.Optimizer) -> None:
    """Schedule-Free optimizers need train/eval switching around validation and checkpoints: when
    ``configure`` is called from a LightningModule attached to a Trainer, add the callback."""
    if not any(optimizer_traits(leaf).eval_mode for leaf in iter_leaf_optimizers(optimizer)):
        return
    if getattr(module, "_trainer", None) is None:
        return
    from .callbacks.schedule_free import attach_schedule_free_switch  # Lightning only when needed

    attach_schedule_free_switch(module)

