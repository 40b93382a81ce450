"""Lightning callbacks (this package may import Lightning; ``optim/`` never does)."""

from .health import PreconditionerHealth, plot_effective_lr
from .nonfinite import NonFiniteError, NonFiniteGuard
from .resume import ResumeCheck, ResumeMismatchError, SafeCheckpointIO
from .schedule_free import ScheduleFreeModeSwitch, attach_schedule_free_switch
from .stability import LossSpikeDetector, StabilityMonitor
from .wallclock import WallClock, format_summary

__all__ = [
    "ScheduleFreeModeSwitch",
    "attach_schedule_free_switch",
    "WallClock",
    "format_summary",
    "StabilityMonitor",
    "LossSpikeDetector",
    "PreconditionerHealth",
    "plot_effective_lr",
    "NonFiniteGuard",
    "NonFiniteError",
    "ResumeCheck",
    "ResumeMismatchError",
    "SafeCheckpointIO",
]
