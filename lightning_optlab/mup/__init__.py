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
:mod:`.cli` (``optlab mup ...``).
"""

from __future__ import annotations

from .lr_find import LRFindResult, group_lr_ratios, lr_range_test
from .rules import RULES, apply_mup_to_groups, mup_family, mup_multipliers
from .shapes import (
    base_config,
    base_shapes_state,
    build_mup_model,
    check_base_shapes,
    fan_in_mults,
    infshapes,
    mup_config,
    require_base_shapes,
    set_base_shapes,
    width_mults,
)
from .transfer import NOT_TRANSFERRED, transfer

__all__ = [
    "RULES",
    "NOT_TRANSFERRED",
    "LRFindResult",
    "apply_mup_to_groups",
    "base_config",
    "base_shapes_state",
    "build_mup_model",
    "check_base_shapes",
    "fan_in_mults",
    "group_lr_ratios",
    "infshapes",
    "lr_range_test",
    "mup_config",
    "mup_family",
    "mup_multipliers",
    "require_base_shapes",
    "set_base_shapes",
    "transfer",
    "width_mults",
]
