"""Lightning callbacks (this package may import Lightning; ``optim/`` never does)."""

from .schedule_free import ScheduleFreeModeSwitch, attach_schedule_free_switch

__all__ = ["ScheduleFreeModeSwitch", "attach_schedule_free_switch"]
