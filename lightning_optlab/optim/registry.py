"""One table from optimizer names to classes; an unknown name lists the known ones.

Classes are resolved lazily (``"module:Class"``), so importing the registry is cheap and an
optimizer family with an optional dependency costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["OPTIMIZERS", "ALIASES", "available_optimizers", "canonical_name", "get_optimizer_class"]

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


def available_optimizers() -> list[str]:
    """Canonical names of every registered optimizer, sorted."""
    return sorted(OPTIMIZERS)


def canonical_name(name: str) -> str:
    """Map a name or alias (case-insensitive, ``-`` same as ``_``) to its canonical name."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}: {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, ALIASES.get(name.strip().lower(), key))
    if key not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}"
            f" (aliases: {', '.join(sorted(ALIASES))})"
        )
    return key


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered under ``name`` (or an alias)."""
    module_name, cls_name = OPTIMIZERS[canonical_name(name)].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, cls_name)
