"""lightning_optlab: modern optimizers for language-model training, for Lightning and plain PyTorch."""

from .configure import MixPart, OptimizerSpec, build_optimizer, configure
from .optim import (
    SGD,
    Adafactor,
    Adagrad,
    Adalayer,
    AdamMini,
    AdamW,
    Lion,
    Muon,
    OptimizerMix,
    ScheduleFreeAdamW,
    Shampoo,
    Signum,
    SOAP,
    Sophia,
    available_optimizers,
    register_optimizer,
    get_optimizer_class,
    sophia_gnb_estimate,
    sophia_hutchinson_estimate,
    torch_optimizer_health,
)
from .params import ROLES, classify_parameters, group_parameters
from .schedules import SCHEDULES, build_scheduler
from .sweep import SweepSpec, build_report, run_sweep

__version__ = "0.1.0"

__all__ = [
    "configure",
    "build_optimizer",
    "OptimizerSpec",
    "MixPart",
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
    "available_optimizers",
    "register_optimizer",
    "get_optimizer_class",
    "torch_optimizer_health",
    "ROLES",
    "classify_parameters",
    "group_parameters",
    "SCHEDULES",
    "build_scheduler",
    "SweepSpec",
    "run_sweep",
    "build_report",
]
