"""μP (maximal update parametrization) for every optimizer family, on top of the `mup` package.

Tune on a narrow proxy, train the wide target with the same numbers (Yang et al. 2022,
"Tensor Programs V", arXiv 2203.03466):

>>> from lightning_optlab.mup import build_mup_model
>>> from lightning_optlab import configure
>>> model = build_mup_model("llama-2.7b", base="llama-50m")      # μP config, base shapes, fan-in init
>>> configure(model, "lion", lr=3e-4, weight_decay=0.1, mup=True)  # per-family group rewrite

Modules: :mod:`.shapes` (base shapes from a config), :mod:`.rules` (per-family rules),
:mod:`.coord` (coordinate check), :mod:`.transfer` (proxy → target recipe), :mod:`.lr_find`
(a μP-respecting LR range test), :mod:`.lr_transfer` (the LR-transfer experiment, μP vs SP),
:mod:`.hf` (μP for Hugging Face models from their config), :mod:`.cli` (``optlab mup ...``).
Names are imported on first use; without the `mup` package they raise a one-line install hint.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule defining it; imported on first use, so that ``optlab mup --help``
#: (and anything that only names this package) works without the `mup` package installed
_EXPORTS = {
    "LRFindResult": "lr_find", "group_lr_ratios": "lr_find", "lr_range_test": "lr_find",
    "RULES": "rules", "apply_mup_to_groups": "rules", "mup_family": "rules", "mup_multipliers": "rules",
    "base_config": "shapes", "base_shapes_state": "shapes", "build_mup_model": "shapes",
    "check_base_shapes": "shapes", "fan_in_mults": "shapes", "infshapes": "shapes", "mup_config": "shapes",
    "require_base_shapes": "shapes", "set_base_shapes": "shapes", "width_mults": "shapes",
    "NOT_TRANSFERRED": "transfer", "transfer": "transfer",
    "coord_check": "coord", "coord_ratios": "coord", "mup_hf_model": "hf", "hf_base_shapes": "hf", "config_at_width": "hf",
    "hf_to_mup": "hf", "is_hf_model": "hf",
    "check_readout_multiplier": "shapes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
