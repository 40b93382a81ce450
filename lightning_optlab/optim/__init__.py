"""Optimizers in plain PyTorch (no Lightning import anywhere under this package)."""

from .adafactor import Adafactor
from .adalayer import Adalayer
from .adam_mini import AdamMini
from .base import HParams, NonFiniteGradientError, OptlabOptimizer, Traits
from .builtin import SGD, Adagrad, AdamW
from .health import HealthMixin, torch_optimizer_health
from .mix import OptimizerMix
from .muon import Muon
from .registry import available_optimizers, canonical_name, get_optimizer_class, register_optimizer, unregister_optimizer
from .schedule_free import ScheduleFreeAdamW
from .shampoo import Shampoo
from .sign import Lion, Signum
from .soap import SOAP
from .sophia import Sophia, sophia_gnb_estimate, sophia_hutchinson_estimate

__all__ = [
    "SGD",
    "AdamW",
    "Adagrad",
    "Adafactor",
    "Adalayer",
    "AdamMini",
    "Lion",
    "Signum",
    "Sophia",
    "sophia_gnb_estimate",
    "sophia_hutchinson_estimate",
    "ScheduleFreeAdamW",
    "Shampoo",
    "SOAP",
    "Muon",
    "OptimizerMix",
    "HealthMixin",
    "torch_optimizer_health",
    "OptlabOptimizer",
    "HParams",
    "Traits",
    "NonFiniteGradientError",
    "register_optimizer",
    "unregister_optimizer",
    "available_optimizers",
    "canonical_name",
    "get_optimizer_class",
]
