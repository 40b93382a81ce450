"""One table from optimizer names to classes; an unknown name lists the known ones.

Classes are resolved lazily (``"module:Class"``), so importing the registry is cheap and an
optimizer family with an optional dependency costs nothing until it is asked for.

The extension point: :func:`register_optimizer` adds a class from outside the package (a subclass
of :class:`~lightning_optlab.optim.base.OptlabOptimizer` with an ``HParams`` dataclass and
``traits``) under a name; it then works wherever a built-in one does (``configure``, YAML
``optimizer.name``, μP with its declared family, the per-role mix, health, the guards, sweeps, the
benchmark). A package can also declare its optimizers as entry points in the group
``lightning_optlab.optimizers`` (``name = "package.module:Class"``); they are registered on the
first lookup, which also reaches the subprocesses of a sweep.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from typing import Iterable

import torch

__all__ = [
    "OPTIMIZERS", "ALIASES", "ENTRY_POINT_GROUP", "available_optimizers", "canonical_name", "get_optimizer_class",
    "register_optimizer", "unregister_optimizer",
]

#: entry-point group through which installed packages register optimizers
ENTRY_POINT_GROUP = "lightning_optlab.optimizers"

#: canonical name -> "module:Class" under lightning_optlab.optim
OPTIMIZERS: dict[str, str] = {
    "sgd": "builtin:SGD",
    "adamw": "builtin:AdamW",
    "adagrad": "builtin:Adagrad",
    "adafactor": "adafactor:Adafactor",
    "lion": "sign:Lion",
    "signum": "sign:Signum",
    "adalayer": "adalayer:Adalayer",
    "sophia": "sophia:Sophia",
    "adam_mini": "adam_mini:AdamMini",
    "schedule_free_adamw": "schedule_free:ScheduleFreeAdamW",
    "shampoo": "shampoo:Shampoo",
    "soap": "soap:SOAP",
    "muon": "muon:Muon",
}

#: alternative spellings -> canonical name
ALIASES: dict[str, str] = {
    "adam": "adamw",
    "adafactor_momentum": "adafactor",
    "signsgd": "signum",
    "sophia_g": "sophia",
    "sophiag": "sophia",
    "adam-mini": "adam_mini",
    "adammini": "adam_mini",
    "schedulefree": "schedule_free_adamw",
    "schedule_free": "schedule_free_adamw",
    "sf_adamw": "schedule_free_adamw",
}


#: canonical name -> class, for optimizers registered from outside the package
_EXTERNAL: dict[str, type] = {}
_entry_points_loaded = False


def register_optimizer(name: str, cls: type, *, aliases: Iterable[str] = (), replace: bool = False) -> None:
    """Register ``cls`` under ``name`` (lowercase letters, digits and ``_``) and optional ``aliases``.

    ``cls`` must derive from :class:`lightning_optlab.optim.OptlabOptimizer` and declare an
    ``hparams_class`` (its kw-only hyperparameter dataclass) and ``traits`` (μP family, roles,
    ...): what the rest of the pack reads. A name already taken raises unless ``replace=True``.

    Example:
        >>> register_optimizer("normalized_sgd", NormalizedSGD)
        >>> configure(model, "normalized_sgd", lr=0.1)
    """
    from .base import HParams, OptlabOptimizer, Traits

    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"optimizer name must be lowercase letters, digits and '_' (e.g. 'my_sgd'), got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, OptlabOptimizer)):
        raise TypeError(
            f"register_optimizer needs a subclass of lightning_optlab.optim.OptlabOptimizer, got {cls!r}; derive the "
            "class from it (before torch.optim.Optimizer) and declare hparams_class and traits"
        )
    if not (issubclass(cls.hparams_class, HParams) and isinstance(cls.traits, Traits)):
        raise TypeError(f"{cls.__name__} must declare hparams_class (an HParams dataclass) and traits (a Traits)")
    aliases = [a.strip().lower().replace("-", "_") for a in aliases]
    taken = [n for n in [name, *aliases] if (n in OPTIMIZERS or n in ALIASES or n in _EXTERNAL)]
    if taken and not replace:
        raise ValueError(f"optimizer name(s) {taken} are already registered; pick another name or pass replace=True")
    _EXTERNAL[name] = cls
    for alias in aliases:
        ALIASES[alias] = name


def unregister_optimizer(name: str) -> None:
    """Remove an optimizer added by :func:`register_optimizer` (and its aliases)."""
    if name not in _EXTERNAL:
        raise ValueError(f"{name!r} was not added by register_optimizer; added: {', '.join(sorted(_EXTERNAL)) or 'none'}")
    del _EXTERNAL[name]
    for alias in [a for a, n in ALIASES.items() if n == name]:
        del ALIASES[alias]


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in OPTIMIZERS and ep.name not in _EXTERNAL:
            register_optimizer(ep.name, ep.load())


def _known() -> set[str]:
    _load_entry_points()
    return set(OPTIMIZERS) | set(_EXTERNAL)


def available_optimizers() -> list[str]:
    """Canonical names of every registered optimizer (built-in and added), sorted."""
    return sorted(_known())


def canonical_name(name: str) -> str:
    """Map a name or alias (case-insensitive, ``-`` same as ``_``) to its canonical name."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}: {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, ALIASES.get(name.strip().lower(), key))
    if key not in _known():
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}"
            f" (aliases: {', '.join(sorted(ALIASES))})"
        )
    return key


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered under ``name`` (or an alias)."""
    key = canonical_name(name)
    if key in _EXTERNAL:
        return _EXTERNAL[key]
    module_name, cls_name = OPTIMIZERS[key].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, cls_name)
