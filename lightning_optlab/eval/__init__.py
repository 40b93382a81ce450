"""Zero-shot evaluation through lm-eval: an in-memory model as an lm-eval LM, offline tasks, a callback.

``ModuleLM`` (the adapter), ``prepare_tasks`` and ``run_tasks`` import no Lightning; ``ZeroShotEval``
(the callback) is imported from :mod:`lightning_optlab.eval.callback` on first use.
"""

from __future__ import annotations

from typing import Any

from .adapter import ModuleLM, chunk_requests, context_length_of, eos_id_of
from .run import (HubUnreachableError, TaskSet, format_table, hub_reachable, metrics_from_results, offline_help,
                  run_tasks, write_results)
from .tasks import DEFAULT_TASKS, SAMPLE_TASKS, hellaswag_preprocess, prepare_samples, prepare_tasks, sample_data_dir

__all__ = ["ModuleLM", "chunk_requests", "context_length_of", "eos_id_of", "HubUnreachableError", "TaskSet",
           "format_table", "hub_reachable", "metrics_from_results", "offline_help", "run_tasks", "write_results",
           "DEFAULT_TASKS", "SAMPLE_TASKS", "hellaswag_preprocess", "prepare_samples", "prepare_tasks",
           "sample_data_dir", "ZeroShotEval"]


def __getattr__(name: str) -> Any:
    if name == "ZeroShotEval":  # the Lightning side, imported only when asked for
        from .callback import ZeroShotEval

        return ZeroShotEval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
