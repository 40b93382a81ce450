"""``ZeroShotEval``: lm-eval zero-shot accuracy of the model being trained, at fit end and every N steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..callbacks.schedule_free import schedule_free_optimizers
from .adapter import ModuleLM
from .run import metrics_from_results, run_tasks, write_results
from .tasks import DEFAULT_TASKS

__all__ = ["ZeroShotEval"]


class ZeroShotEval(Callback):
    """Evaluates the LightningModule on lm-eval tasks and logs ``eval/<task>/acc`` (and ``acc_norm``).

    The module must map token ids ``(B, T)`` to logits ``(B, T, V)`` (as
    :class:`~lightning_optlab.lit.CausalLMModule` does). The tokenizer is ``pl_module.tokenizer``,
    else ``trainer.datamodule.tokenizer``; the context length ``pl_module.model.config.block_size``
    (or ``max_length``). Schedule-Free optimizers are switched to their evaluation weights x for the
    evaluation and back afterwards; the module's train/eval mode and the global random states are
    restored too, so an evaluation in the middle of training does not change the training run.

    Args:
        tasks: lm-eval task or group names (default: ARC-Easy, ARC-Challenge, HellaSwag, MMLU, the
            budget study's four).
        task_dir: a folder made by ``optlab eval prepare`` (offline data); ``None``: lm-eval's
            built-in tasks from the hub — without network this fails within seconds, saying how to
            provide local data.
        every_n_steps: also evaluate every this many optimizer steps (``None``: only at fit end).
        limit: documents per task (quick checks); ``None``: all.
        batch_size: sequences per forward pass.
        max_length: context length when the model's config has none.
        num_fewshot: prompt examples (0, zero-shot, by default).
        results_dir: where lm-eval's results JSON goes (default: the checkpoint callback's folder,
            else the trainer's log dir); one ``zeroshot_step<N>.json`` per evaluation.
        distributed: ``"shard"`` (each rank scores its share of the documents; lm-eval gathers the
            metrics on rank 0) or ``"rank_zero"`` (rank 0 evaluates, the others wait). Errors while
            loading tasks (missing data, no network) are shared, so every rank raises; an error in
            the middle of a sharded evaluation leaves the other ranks waiting until the process
            group's timeout, as any failed collective does.

    Logged through ``trainer.loggers`` (rank 0) at the index of the same step's ``train/loss`` (``global_step − 1``:
    Lightning logs update k's training metrics at k − 1) and put into
    ``trainer.callback_metrics`` on every rank; :attr:`history` keeps ``(step, metrics)``.

    Example:
        >>> trainer = L.Trainer(callbacks=[ZeroShotEval(task_dir="tasks", limit=200)])
    """

    def __init__(self, tasks: Sequence[str] = DEFAULT_TASKS, *, task_dir: str | Path | None = None,
                 every_n_steps: int | None = None, limit: int | float | None = None, batch_size: int = 16,
                 max_length: int | None = None, num_fewshot: int = 0, results_dir: str | Path | None = None,
                 distributed: str = "shard") -> None:
        super().__init__()
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",") if t]
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one lm-eval task, e.g. ['arc_easy']")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1 or None, got {every_n_steps}")
        if limit is not None and not limit > 0:
            raise ValueError(f"limit must be > 0 or None, got {limit}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be ≥ 0, got {num_fewshot}")
        if distributed not in ("shard", "rank_zero"):
            raise ValueError(f"distributed must be 'shard' or 'rank_zero', got {distributed!r}")
        self.task_dir = task_dir
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_fewshot = num_fewshot
        self.results_dir = results_dir
        self.distributed = distributed
        #: (global step, metrics) of every evaluation so far
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step = -1

    @property
    def state_key(self) -> str:
        # several ZeroShotEval callbacks (other tasks, schedules) may share a trainer and a checkpoint
        return self._generate_state_key(tasks=",".join(self.tasks), task_dir=str(self.task_dir),
                                        every_n_steps=self.every_n_steps, limit=self.limit,
                                        num_fewshot=self.num_fewshot, distributed=self.distributed)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)
        elif self.history:
            # evaluated at this very step before a resume: the scores are in the restored history,
            # and callback_metrics (which a sweep reads) should hold them as after a fresh run
            for key, value in self.history[-1][1].items():
                trainer.callback_metrics.setdefault(key, torch.tensor(value))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), dict(m)) for s, m in state_dict.get("history", [])]
        self._last_step = int(state_dict.get("last_step", -1))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, float]:
        """Run the tasks now; returns (and logs) the metrics on every rank."""
        tokenizer = self._tokenizer(trainer, pl_module)
        world = trainer.world_size
        shard = self.distributed == "shard" and world > 1
        lm = ModuleLM(pl_module, tokenizer, max_length=self.max_length, batch_size=self.batch_size,
                      rank=trainer.global_rank if shard else 0, world_size=world if shard else 1)
        restore = [opt for opt in schedule_free_optimizers(list(trainer.optimizers or []))
                   if any(g.get("train_mode") for g in opt.param_groups)]
        for opt in restore:
            opt.eval()  # parameters hold x, the Schedule-Free average, while evaluating
        outcome: dict[str, Any] = {"error": None, "results": None}
        try:
            if shard or trainer.global_rank == 0:
                outcome["results"] = run_tasks(lm, self.tasks, task_dir=self.task_dir, limit=self.limit,
                                               num_fewshot=self.num_fewshot)
        except Exception as err:  # every rank must reach the broadcast below, or the others would hang
            if world == 1:
                raise
            outcome["error"] = f"{type(err).__name__}: {err}"
        finally:
            for opt in restore:
                opt.train()
        if world > 1:
            # rank 0 holds the results; sharing its outcome is also the barrier the others wait at
            errors = [None] * world
            torch.distributed.all_gather_object(errors, outcome["error"])
            failed = next((e for e in errors if e), None)
            if failed:
                raise RuntimeError(f"ZeroShotEval failed on a rank: {failed}")
            box = [outcome["results"]]
            torch.distributed.broadcast_object_list(box, src=0)
            outcome["results"] = box[0]
        results = outcome["results"]
        metrics = metrics_from_results(results, self.tasks)
        step = trainer.global_step
        out_dir = self._results_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.global_rank == 0:
            write_results(results, out_dir / f"zeroshot_step{step}.json")
            for logger in trainer.loggers:
                # at train/loss's index: Lightning logs update k's training metrics at k - 1
                logger.log_metrics(metrics, step=max(0, step - 1))
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.history.append((step, metrics))
        self._last_step = step
        return metrics

    def _tokenizer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("ZeroShotEval needs a tokenizer: give the LightningModule a `tokenizer` attribute or "
                             "train with a datamodule that has one (LMDataModule)")
        return tokenizer

    def _results_dir(self, trainer: "pl.Trainer") -> Path:
        if self.results_dir is not None:
            return Path(self.results_dir)
        ckpt = getattr(trainer, "checkpoint_callback", None)
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath:
            return Path(dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)
