"""Zero-shot evaluation through lm-eval: an in-memory model as an lm-eval LM, offline tasks, a callback.

``ModuleLM`` (the adapter), ``prepare_tasks`` and ``run_tasks`` import no Lightning; ``ZeroShotEval``
(the callback) is imported from :mod:`lightning_optlab.eval.callback` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule defining it, imported on first use: ``optlab eval --help``, the task
#: files and the demo's report work without lm-eval; the adapter and the runner need it
_EXPORTS = {
    "ModuleLM": "adapter", "chunk_requests": "adapter", "context_length_of": "adapter", "eos_id_of": "adapter",
    "HubUnreachableError": "run", "TaskSet": "run", "format_table": "run", "hub_reachable": "run",
    "metrics_from_results": "run", "offline_help": "run", "run_tasks": "run", "write_results": "run",
    "DEFAULT_TASKS": "tasks", "SAMPLE_TASKS": "tasks", "hellaswag_preprocess": "tasks", "prepare_samples": "tasks",
    "prepare_tasks": "tasks", "sample_data_dir": "tasks",
    "ZeroShotEval": "callback",  # the Lightning side
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module in ("adapter", "run", "callback"):
        from .._extras import require

        require("lm_eval")  # a one-line install hint when it is missing
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
