"""Run lm-eval tasks on an in-memory model: task loading (local or hub), hub checks, metrics, tables.

No Lightning import: the callback, the CLI and the demo all call :func:`run_tasks`.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .adapter import ModuleLM

__all__ = ["HubUnreachableError", "hub_reachable", "offline_help", "TaskSet", "run_tasks", "metrics_from_results",
           "format_table", "write_results"]

#: where the hub is (``HF_ENDPOINT`` overrides it, as in ``huggingface_hub``)
DEFAULT_HUB = "https://huggingface.co"


class HubUnreachableError(RuntimeError):
    """lm-eval's built-in tasks need the Hugging Face hub and it cannot be reached."""


def offline_help(tasks: Sequence[str]) -> str:
    """How to evaluate without network (the text of :class:`HubUnreachableError`)."""
    return (
        f"tasks {list(tasks)} read their data from the Hugging Face hub, which cannot be reached from here. "
        "Provide local data instead: download ARC (ARC-V1-Feb2018), HellaSwag (hellaswag_val.jsonl) and MMLU "
        "(data/ of data.tar) elsewhere, then run `optlab eval prepare --arc ARC-V1-Feb2018 --hellaswag DIR "
        "--mmlu data --out TASK_DIR` (or `optlab eval prepare --samples --out TASK_DIR` for the shipped "
        "samples) and pass `task_dir=TASK_DIR` (ZeroShotEval) / `--task-dir TASK_DIR` (optlab eval). "
        "If the hub datasets are already in the local Hugging Face cache, set HF_DATASETS_OFFLINE=1 and "
        "HF_HUB_OFFLINE=1 to use the cache."
    )


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (``HF_ENDPOINT`` or huggingface.co) answers an HTTP ``HEAD`` within ``timeout`` s.

    Any HTTP answer counts (an error status too: the server is there). The request (name lookup
    included, which ignores socket timeouts) runs in a daemon thread, so the answer comes within
    ``timeout`` seconds even when the network drops packets silently or a middlebox accepts the
    connection and never answers.
    """
    import urllib.error
    import urllib.request

    url = os.environ.get("HF_ENDPOINT", DEFAULT_HUB).rstrip("/") + "/api/datasets?limit=1"
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="optlab-hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


#: folders (under lm_eval/tasks) of the built-in tasks the studies use: indexing only these takes
#: a fraction of a second, the whole built-in index about 13 s
_BUILTIN_FOLDERS = {"arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "mmlu": "mmlu/default"}


def _builtin_folders(tasks: Sequence[str]) -> list[str] | None:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    folders = []
    for task in tasks:
        sub = _BUILTIN_FOLDERS.get(task) or ("mmlu/default" if task.startswith("mmlu_") else None)
        if sub is None or not (root / sub).is_dir():
            return None
        folders.append(str(root / sub))
    return sorted(set(folders))


def _task_manager(task_dir: str | Path | None, tasks: Sequence[str]) -> Any:
    from lm_eval.tasks import TaskManager

    if task_dir is None:
        if not _offline_env() and not hub_reachable():
            raise HubUnreachableError(offline_help(tasks))
        folders = _builtin_folders(tasks)
        return TaskManager() if folders is None else TaskManager(include_path=folders, include_defaults=False)
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"task_dir {task_dir} is not a folder; create it with `optlab eval prepare` "
                                "(lightning_optlab.eval.prepare_tasks)")
    # Only the local definitions: no built-in index (13 s), no hub.
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"tasks {missing} are not defined in {task_dir}; it defines: "
                         f"{', '.join(t for t in manager.all_tasks if not t.startswith('mmlu_')) or 'nothing'}")
    return manager


def _rng_state() -> tuple[Any, ...]:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Any, ...]) -> None:
    import numpy as np

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _cache_dir(task_dir: str | Path | None, cache_dir: str | Path | None) -> Path | None:
    """The ``datasets`` cache for a task load: ``cache_dir``; for local tasks ``TASK_DIR/.datasets_cache``
    (an offline run keeps its cache beside its task files, not in the user's Hugging Face cache) unless
    ``HF_DATASETS_CACHE`` is set; ``None`` (the library's own) for hub tasks."""
    if cache_dir is not None:
        return Path(cache_dir)
    if task_dir is not None and not os.environ.get("HF_DATASETS_CACHE"):
        return Path(task_dir) / ".datasets_cache"
    return None


class _datasets_cache:
    """Point ``datasets``' cache (read at each ``load_dataset`` call) at ``folder`` for a block."""

    _KEYS = ("HF_DATASETS_CACHE", "DOWNLOADED_DATASETS_PATH", "EXTRACTED_DATASETS_PATH")

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.saved = folder, None

    def __enter__(self) -> None:
        if self.folder is None:
            return
        import datasets.config as dc

        self.saved = {k: getattr(dc, k) for k in self._KEYS if hasattr(dc, k)}
        values = {"HF_DATASETS_CACHE": self.folder, "DOWNLOADED_DATASETS_PATH": self.folder / "downloads",
                  "EXTRACTED_DATASETS_PATH": self.folder / "downloads" / "extracted"}
        for k in self.saved:
            setattr(dc, k, values[k])

    def __exit__(self, *exc: Any) -> None:
        if self.saved:
            import datasets.config as dc

            for k, v in self.saved.items():
                setattr(dc, k, v)


class TaskSet:
    """lm-eval tasks loaded once (datasets read, prompts configured), to evaluate several models.

    Args: as :func:`run_tasks`. Loading reads the data (local files, or the hub: see ``task_dir``).
    ``cache_dir``: where ``datasets`` writes its cache of the task data; default ``TASK_DIR/.datasets_cache``
    for local tasks (unless ``HF_DATASETS_CACHE`` is set), the Hugging Face cache for hub tasks.
    """

    def __init__(self, tasks: Sequence[str], *, task_dir: str | Path | None = None, num_fewshot: int = 0,
                 fewshot_seed: int = 1234, cache_dir: str | Path | None = None) -> None:
        self.names = list(tasks)
        if not self.names:
            raise ValueError("tasks is empty: name at least one lm-eval task, e.g. ['arc_easy']")
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be ≥ 0, got {num_fewshot}")
        self.task_dir = task_dir
        self.num_fewshot = num_fewshot
        manager = _task_manager(task_dir, self.names)
        #: where the ``datasets`` library writes its Arrow cache of the task files
        self.cache_dir = _cache_dir(task_dir, cache_dir)
        try:
            with _datasets_cache(self.cache_dir):
                self.loaded = manager.load(self.names)
        except Exception as err:  # datasets / hub errors with the cache-only env vars set
            if task_dir is None and _is_network_error(err):
                raise HubUnreachableError(offline_help(self.names)) from err
            raise
        for task in self.loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=fewshot_seed)


def run_tasks(lm: ModuleLM, tasks: Sequence[str] | TaskSet, *, task_dir: str | Path | None = None,
              limit: int | float | None = None, num_fewshot: int = 0, fewshot_seed: int = 1234
              ) -> dict[str, Any] | None:
    """Evaluate ``lm`` on lm-eval ``tasks``; lm-eval's results dict on rank 0, ``None`` on other ranks.

    Args:
        lm: the model (a :class:`ModuleLM`; its ``rank``/``world_size`` shard the documents).
        tasks: task or group names (``arc_easy``, ``mmlu``, ...), or a :class:`TaskSet` loaded before.
        task_dir: a folder made by :func:`~lightning_optlab.eval.prepare_tasks` (offline); ``None`` uses
            lm-eval's built-in tasks, which read the hub: if it cannot be reached (and neither
            ``HF_DATASETS_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set) this raises
            :class:`HubUnreachableError` within seconds.
        limit: documents per task (an int), or a fraction of each task (a float < 1).
        num_fewshot: examples in the prompt (0: zero-shot, as the studies evaluate).
        fewshot_seed: seed of the few-shot sampler.

    The global random states (Python, NumPy, torch) are restored afterwards, so evaluating in the
    middle of training leaves the training run's random stream as it was.
    """
    from lm_eval.evaluator import evaluate

    if limit is not None and not (limit > 0):
        raise ValueError(f"limit must be > 0 (documents per task, or a fraction < 1), got {limit}")
    state = _rng_state()
    start = time.perf_counter()
    try:
        suite = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks, task_dir=task_dir, num_fewshot=num_fewshot,
                                                                 fewshot_seed=fewshot_seed)
        results = evaluate(lm=lm, task_dict=suite.loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        _set_rng_state(state)
    if results is None:
        return None
    results = dict(results)
    results["config"] = {"model": type(lm.model).__name__, "batch_size": lm.batch_size, "max_length": lm.max_length,
                         "limit": limit, "num_fewshot": suite.num_fewshot,
                         "task_dir": str(suite.task_dir) if suite.task_dir else None, "world_size": lm.world_size,
                         "seconds": time.perf_counter() - start}
    return results


def _is_network_error(err: BaseException) -> bool:
    while err is not None:
        module = type(err).__module__.split(".")[0]
        if isinstance(err, (ConnectionError, TimeoutError)) or module in {"huggingface_hub", "requests", "httpx",
                                                                          "urllib3", "datasets"}:
            return True
        err = err.__cause__ or err.__context__
    return False


def metrics_from_results(results: dict[str, Any], tasks: Sequence[str], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>/acc": ..., "eval/<task>/acc_norm": ...}`` for the requested tasks and groups.

    A group (``mmlu``) gives its aggregate ``acc`` (lm-eval's size-weighted mean over subjects).
    """
    out: dict[str, float] = {}
    table = results.get("results", {})
    for task in tasks:
        row = table.get(task)
        if row is None:
            raise KeyError(f"lm-eval returned no results for {task!r}; it returned {sorted(table)}")
        for metric in ("acc", "acc_norm"):
            value = row.get(f"{metric},none")
            if isinstance(value, (int, float)):
                out[f"{prefix}/{task}/{metric}"] = float(value)
    return out


def format_table(rows: dict[str, dict[str, float]], tasks: Sequence[str], prefix: str = "eval") -> str:
    """A markdown table: one row per model, ``acc`` (and ``acc_norm``) per task."""
    header = ["model"]
    cols = []
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            key = f"{prefix}/{task}/{metric}"
            if any(key in r for r in rows.values()):
                header.append(f"{task} {metric}")
                cols.append(key)
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(cols) + "|"]
    for name, r in rows.items():
        lines.append("| " + " | ".join([name] + [f"{r[c]:.3f}" if c in r else "-" for c in cols]) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write lm-eval's results dict as JSON (atomically), as lm-eval's own CLI writes it."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)
    return path
