"""``NonFiniteGuard``: catch a NaN/Inf in gradients, parameters or optimizer state, then act.

The check sums every tensor (a NaN or an Inf anywhere makes the sum non-finite; +inf and -inf
give NaN): large tensors one reduction each, small ones concatenated per device and dtype in
bounded batches and reduced together, which on small models is 2-3x cheaper than one foreach
norm per tensor (per-tensor dispatch dominates there); ``isfinite`` of the partial sums is read
back with one host synchronization. A sum can overflow on huge finite values, so a failed fast
check is confirmed tensor by tensor with inf-norms (which cannot overflow) before anything is
reported, and only then are the culprits named.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from .health import _param_names as _names, leaf_optimizers, unwrap_optimizer

__all__ = ["NonFiniteGuard", "NonFiniteError", "nonfinite_indices"]

ACTIONS = ("raise", "skip", "stop")
_BIG = 1 << 16  # tensors this large are summed on their own
_BATCH = 1 << 22  # smaller ones are concatenated (copied) in batches of up to this many elements
_SHOW = 5  # culprits named in a message


class NonFiniteError(RuntimeError):
    """A NaN or Inf was found in training (raised by :class:`NonFiniteGuard`)."""


def nonfinite_indices(tensors: list[Tensor]) -> list[int]:
    """Indices of the tensors holding a NaN or an Inf: one ``_foreach_norm`` per device and dtype,
    one host synchronization when all are finite.

    Empty tensors are finite; sparse tensors are checked through their stored values.
    """
    sums: list[Tensor] = []
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    pending = 0
    for t in tensors:
        n = t.numel()
        if not n:
            continue
        v = _values(t)
        if n >= _BIG or not v.is_contiguous():
            sums.append(v.sum(dtype=torch.float32))  # one reduction, no copy
            continue
        small.setdefault((v.device, v.dtype), []).append(v.view(-1))
        pending += n
        if pending >= _BATCH:  # bounded copies: at most _BATCH elements at a time
            sums.extend(torch.cat(vs).sum(dtype=torch.float32) for vs in small.values())
            small, pending = {}, 0
    sums.extend(torch.cat(vs).sum(dtype=torch.float32) for vs in small.values())
    if not sums:
        return []
    device = sums[0].device
    if bool(torch.isfinite(torch.stack([x.to(device) for x in sums])).all()):  # the common path
        return []
    return _nonfinite_exact(tensors)


def _nonfinite_exact(tensors: list[Tensor]) -> list[int]:
    """Tensor-by-tensor confirmation with inf-norms (no overflow on large finite values)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            by_device.setdefault(t.device, []).append(i)
    flags: list[tuple[list[int], Tensor]] = []
    for idx in by_device.values():
        views = [_values(tensors[i]) for i in idx]
        norms = torch.stack([n.float() for n in torch._foreach_norm(views, math.inf)])
        flags.append((idx, torch.isfinite(norms)))
    if not flags:
        return []
    return [idx[j] for idx, f in flags for j in (~f).nonzero().flatten().tolist()]


def _values(t: Tensor) -> Tensor:
    t = t.detach()
    if hasattr(t, "to_local"):  # a DTensor (FSDP2): this rank's shard; the decision is reduced over ranks
        t = t.to_local()
    return t.coalesce().values() if t.is_sparse else t


def _merge_found(trainer: "pl.Trainer", found: list[str]) -> list[str]:
    """Every rank's findings (in rank order, each once): a NaN in one rank's shard is named on all."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return found
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(found))
    return list(dict.fromkeys(f for rank_found in gathered for f in rank_found or []))


def _kind(t: Tensor) -> str:
    t = _values(t)
    return "nan" if torch.isnan(t).any() else "inf"


class NonFiniteGuard(Callback):
    """Checks gradients before every optimizer update and parameters/state after it, then acts.

    Args:
        action: what to do on a NaN or Inf:

            * ``"raise"``: raise :class:`NonFiniteError` naming the tensors (parameter names, and
              the state key for optimizer state) and the step (``trainer.global_step`` before the
              update; a bad gradient is caught before it is applied);
            * ``"skip"``: drop the update: the gradients are set to ``None`` so every optimizer of
              the pack (and torch's) leaves those parameters and their state alone, and the
              param-group entries a step advances regardless of gradients (Schedule-Free's ``k``,
              ``weight_sum``) are restored right after ``step()``. The step still counts for
              Lightning: ``global_step`` advances and a step-interval LR scheduler steps, so the
              schedule moves on by one step, as with GradScaler's skipped steps under fp16;
              ``max_steps`` includes skipped steps. More than ``max_consecutive_skips`` skips in a
              row raise;
            * ``"stop"``: skip the update likewise, save the last good state (weights and
              optimizer state from before the bad update) with ``trainer.save_checkpoint`` as
              ``nonfinite-guard-before-step=<k>.ckpt`` in the run's checkpoint directory (a new
              file: earlier checkpoints are left intact), then stop (``trainer.should_stop``).
        check_every_n_steps: check the steps whose index ``global_step`` is a multiple of this.
            Default (None): every step for ``skip`` and ``stop`` (each bad update must be caught
            to be undone), every 20th step for ``raise``, whose job is to stop a broken run with
            a clear message: a NaN or Inf that reaches the weights stays there, so it is caught at
            the next checked step at the latest (the message names the step where it was found);
            this keeps the guard's cost within the pack's 1% overhead budget on small models.
            Pass 1 to catch the very first bad gradient. Whatever the rate, a checkpoint is never
            written with non-finite weights or optimizer state: the guard checks in
            ``on_save_checkpoint`` and raises before the file is written, so the last good
            checkpoint on disk stays the last one (weights-only checkpoints, for which Lightning
            skips that hook, are checked just before their ``ModelCheckpoint`` saves), and a run
            never ends quietly with non-finite weights (a last check at the end of training).
        check_state: also check the optimizer state after each checked step.
        snapshot: keep a copy of the parameters, optimizer state and param groups from before each
            checked step (one more model's worth of parameters and optimizer state in memory, on
            the same device, plus a copy per checked step). Needed for ``skip``/``stop`` to undo
            what a gradient check cannot catch: a non-finite *update* from finite gradients
            (found after the step) and state changed outside ``optimizer.step`` (Sophia's Hessian
            estimate runs in the training step). Without it such a finding raises whatever the
            action, since the last good state is gone and stopping "cleanly" would let other
            callbacks checkpoint the corrupted one.
        max_consecutive_skips: raise after this many skipped steps in a row (``skip``).
        dirpath: directory for ``stop``'s checkpoint (default: the ``ModelCheckpoint``'s
            directory, else ``<log_dir or default_root_dir>/checkpoints``).

    Optimizers that skip a non-finite gradient themselves (the pack's ``nonfinite="skip"`` policy,
    SOAP's, Shampoo's and Muon's default) report each skip (``optimizer.pop_nonfinite_skips()``);
    the guard reads that after every optimizer step, checked or not (no device read), and acts on
    it by ``action``: ``raise`` raises naming the parameters, ``skip`` records it (the optimizer has
    already left those parameters alone), ``stop`` saves and stops. Sophia's estimate from
    non-finite logits is reported the same way.

    Under fp16 mixed precision the GradScaler already skips steps with non-finite gradients
    (expected while it calibrates its scale), so gradient checks are left to it; parameters and
    state are still checked. Under DDP every rank sees the same (all-reduced) gradients; under
    FSDP2 (``ModelParallelStrategy``) each rank checks its own shards. The decision is reduced over
    ranks (any rank finding a NaN counts: every rank raises, skips or stops alike), the findings are
    gathered so every rank's message names them all, the optimizer's own skips are reduced too (one
    small all-reduce per step with more than one rank), and ``stop`` saves on every rank as
    Lightning requires (a distributed checkpoint under FSDP2). Cost: one host synchronization per checked step for the
    gradients and one for parameters and state.

    Example:
        >>> trainer = L.Trainer(callbacks=[NonFiniteGuard(action="stop")])
    """

    def __init__(
        self,
        action: str = "raise",
        check_every_n_steps: Optional[int] = None,
        check_state: bool = True,
        snapshot: bool = False,
        max_consecutive_skips: int = 10,
        dirpath: Optional[str | Path] = None,
    ) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(repr(a) for a in ACTIONS)}, got {action!r}")
        if check_every_n_steps is None:
            check_every_n_steps = 20 if action == "raise" else 1
        counts = (("check_every_n_steps", check_every_n_steps), ("max_consecutive_skips", max_consecutive_skips))
        for name, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name, value in (("check_state", check_state), ("snapshot", snapshot)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.check_state = check_state
        self.snapshot = snapshot
        self.max_consecutive_skips = max_consecutive_skips
        self.dirpath = Path(dirpath) if dirpath is not None else None
        #: every finding: {"step", "where", "tensors", "action"}
        self.events: list[dict[str, Any]] = []
        #: checkpoints written by the "stop" action
        self.saved_checkpoints: list[str] = []
        self._consecutive_skips = 0
        self._amp = False
        self._pending: Optional[int] = None  # index of the checked step under way
        self._skip: Optional[tuple[Any, list[dict[str, Any]]]] = None  # (optimizer, group entries) to put back
        self._stop_at: Optional[int] = None  # step whose last good state "stop" saves at batch end
        self._snap: Optional[_Snapshot] = None
        self._hooks: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action)

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "consecutive_skips": self._consecutive_skips}

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Runs while the checkpoint is assembled, before the file is written: refusing here keeps
        # the last good checkpoint on disk the newest one.
        self._refuse_if_nonfinite(trainer, pl_module, "values in the state about to be checkpointed")

    def _refuse_if_nonfinite(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", what: str,
                             where: str = "checkpoint", tail: Optional[str] = None) -> None:
        """Raise :class:`NonFiniteError` if any parameter (or state tensor) is not finite."""
        if not trainer.optimizers:
            return
        tensors, labels = self._tensors_to_check(trainer, pl_module)
        bad = nonfinite_indices(tensors)
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        found = _merge_found(trainer, [f"{labels[i]} ({_kind(tensors[i])})" for i in bad])
        step = trainer.global_step
        self._record(step, where, found)
        if tail is None:
            tail = (f"The checkpoint was not written, so the last one saved is still the newest good state. The guard "
                    f"checks every {self.check_every_n_steps} steps; check_every_n_steps=1 catches the first bad update.")
        raise NonFiniteError(_message(what, step, found, len(tensors), tail))

    def _before_weights_only_save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", at_step_end: bool) -> None:
        if self._weights_only_save_may_follow(trainer, at_step_end):
            self._refuse_if_nonfinite(trainer, pl_module, "values about to be saved by a weights-only checkpoint")

    def _weights_only_save_may_follow(self, trainer: "pl.Trainer", at_step_end: bool) -> bool:
        """Whether a ``ModelCheckpoint(save_weights_only=True)`` may save right after this hook.
        Lightning does not call ``on_save_checkpoint`` for weights-only saves, so the guard checks
        before them; it runs before ``ModelCheckpoint`` in the same hook (Lightning puts checkpoint
        callbacks last)."""
        for cb in trainer.checkpoint_callbacks:
            if not getattr(cb, "save_weights_only", False):
                continue
            if not at_step_end:
                return True  # epoch-end and validation-end saves
            n = getattr(cb, "_every_n_train_steps", 0) or 0
            if getattr(cb, "_train_time_interval", None) is not None or (n > 0 and trainer.global_step % n == 0):
                return True
        return False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
        self._consecutive_skips = int(state_dict.get("consecutive_skips", 0))

    # --- hooks ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._amp = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self._amp:
            rank_zero_warn("NonFiniteGuard: fp16 GradScaler skips steps with non-finite gradients itself; "
                           "only parameters and optimizer state are checked")
        self._remove_hooks()
        # The after-update check runs in a step post-hook: after step(), before the LR scheduler.
        hook = functools.partial(self._after_step, trainer, pl_module)
        self._hooks = [unwrap_optimizer(o).register_step_post_hook(hook) for o in trainer.optimizers]

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        # The steps between checks end here: a run must not finish quietly with non-finite weights.
        if not trainer.sanity_checking:
            self._refuse_if_nonfinite(trainer, pl_module, "values at the end of training",
                                      where="end of training", tail=self._rate_hint())

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._before_weights_only_save(trainer, pl_module, at_step_end=False)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._before_weights_only_save(trainer, pl_module, at_step_end=False)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hooks()

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.snapshot and self._due(step) and (self._snap is None or self._snap.step != step):
            self._snap = _Snapshot(step, [unwrap_optimizer(o) for o in trainer.optimizers])

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        step = trainer.global_step
        self._pending = step if self._due(step) else None
        self._skip = None
        if self._pending is None or self._amp:
            return
        opt = unwrap_optimizer(optimizer)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        bad = nonfinite_indices([p.grad for p in params])
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        names = _names(pl_module)
        found = _merge_found(trainer, [f"{names.get(id(params[i]), f'param{i}')} ({_kind(params[i].grad)})" for i in bad])
        self._record(step, "gradient", found)
        if self.action == "raise":
            raise NonFiniteError(_message("gradient", step, found, len(params), "The update was not applied." + self._rate_hint()))
        # Skip: without gradients every optimizer leaves the parameters and their state alone;
        # the group entries a step advances anyway are put back by the post-hook.
        self._skip = (opt, [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = None
        self._after_skip(trainer, step, found, "gradient")

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stop_at is not None:
            step, self._stop_at = self._stop_at, None
            self._save_and_stop(trainer, step)
        else:
            self._before_weights_only_save(trainer, pl_module, at_step_end=True)

    # --- checks and actions ---------------------------------------------------------------------

    def _rate_hint(self) -> str:
        n = self.check_every_n_steps
        return (f" Checked every {n} steps, so it may have started up to {n - 1} steps earlier "
                f"(check_every_n_steps=1 finds the first bad step).") if n > 1 else ""

    def _due(self, step: int) -> bool:
        return step % self.check_every_n_steps == 0

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def _after_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any, args: Any, kwargs: Any
    ) -> None:
        self._optimizer_skips(trainer, optimizer)
        step, self._pending = self._pending, None
        if step is None:
            return  # not a checked step (or a step taken outside Lightning's loop)
        snap = self._snap if self._snap is not None and self._snap.step == step else None
        if self._skip is not None:
            opt, groups = self._skip
            self._skip = None
            if snap is not None:  # also undoes state written outside step() (Sophia's estimator)
                snap.restore()
            _restore_groups(opt.param_groups, groups)
            return
        tensors, labels = self._tensors_to_check(trainer, pl_module)
        bad = nonfinite_indices(tensors)
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self._consecutive_skips = 0
            return
        found = _merge_found(trainer, [f"{labels[i]} ({_kind(tensors[i])})" for i in bad])
        where = "update" if any(f.startswith("parameter") for f in found) else "optimizer state"
        self._record(step, where, found)
        if self.action == "raise" or snap is None:
            hint = "" if self.action == "raise" else (
                " The last good state is gone: NonFiniteGuard(snapshot=True) keeps a copy so that skip/stop can undo "
                "such an update; checkpoints saved earlier are untouched.")
            raise NonFiniteError(_message(f"{where} after the update", step, found, len(tensors), hint + self._rate_hint()))
        snap.restore()
        self._after_skip(trainer, step, found, where)

    def _optimizer_skips(self, trainer: "pl.Trainer", optimizer: Any) -> None:
        """Act on the updates the optimizer itself skipped for non-finite values (its ``nonfinite="skip"``
        policy, reported by ``pop_nonfinite_skips``): read after every step, checked or not (no device read)."""
        pop = getattr(optimizer, "pop_nonfinite_skips", None)
        skipped = pop() if callable(pop) else []
        if trainer.world_size > 1:
            # an optimizer that skipped on one rank only (a NaN in its shard, or on the owner rank
            # of a matrix) must make every rank act alike: one small all-reduce per step
            if not trainer.strategy.reduce_boolean_decision(bool(skipped), all=False):
                return
        elif not skipped:
            return
        step = trainer.global_step
        found = _merge_found(trainer, [f"{what} (skipped by the optimizer)" for what in skipped])
        self._record(step, "gradient", found)
        if self.action == "raise":
            raise NonFiniteError(_message(
                "gradient", step, found, len(found),
                "The optimizer left those parameters as they were (its nonfinite='skip' policy) and stepped the others."))
        self._after_skip(trainer, step, found, "gradient")

    def _tensors_to_check(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> tuple[list[Tensor], "_Labels"]:
        """The parameters (and state tensors) to check, and their labels, computed only when a
        finding has to be reported (names cost more than the check on small models)."""
        tensors: list[Tensor] = []
        owners: list[tuple[Tensor, Optional[str]]] = []  # (parameter, state key or None)
        seen: set[int] = set()
        for opt in (unwrap_optimizer(o) for o in trainer.optimizers):
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        tensors.append(p)
                        owners.append((p, None))
            if not self.check_state:
                continue
            for leaf in leaf_optimizers(opt):
                for p, st in leaf.state.items():
                    for key, v in st.items():
                        if isinstance(v, Tensor) and v.is_floating_point():
                            tensors.append(v)
                            owners.append((p, key))
        return tensors, _Labels(pl_module, owners)

    def _after_skip(self, trainer: "pl.Trainer", step: int, found: list[str], where: str) -> None:
        self._consecutive_skips += 1
        if self.action == "stop":
            self._stop_at = step
            return
        if self._consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteError(
                f"NonFiniteGuard skipped {self._consecutive_skips} steps in a row (the last at step {step}, "
                f"{found[0]}); training is not recovering. Lower the learning rate or raise max_consecutive_skips."
            )
        rank_zero_warn(f"NonFiniteGuard: skipped the update of step {step}: non-finite {where} in {', '.join(found[:_SHOW])}")
        _log(trainer, {"nonfinite/skipped_steps": float(sum(e["action"] == "skip" for e in self.events))}, step)

    def _save_and_stop(self, trainer: "pl.Trainer", step: int) -> None:
        path = _unique(self._checkpoint_dir(trainer) / f"nonfinite-guard-before-step={step}.ckpt")
        path = Path(trainer.strategy.broadcast(str(path)))
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer and callbacks too
        self.saved_checkpoints.append(str(path))
        trainer.should_stop = True
        rank_zero_warn(f"NonFiniteGuard: non-finite values at step {step}; saved the state from before that update "
                       f"to {path} and stopped training")

    def _checkpoint_dir(self, trainer: "pl.Trainer") -> Path:
        if self.dirpath is not None:
            return self.dirpath
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _record(self, step: int, where: str, found: list[str]) -> None:
        self.events.append({"step": step, "where": where, "tensors": found[:_SHOW], "action": self.action})


def _restore_groups(param_groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    for g, entries in zip(param_groups, saved):
        for k in [k for k in g if k != "params" and k not in entries]:
            del g[k]
        g.update(entries)


class _Snapshot:
    """Copies of parameters, optimizer state and param-group entries, restorable in place."""

    def __init__(self, step: int, optimizers: list[Any]) -> None:
        self.step = step
        self.params: dict[Tensor, Tensor] = {}
        self.states: list[tuple[Any, dict[Tensor, dict[str, Any]]]] = []
        self.groups: list[tuple[dict[str, Any], dict[str, Any]]] = []
        with torch.no_grad():
            for opt in optimizers:
                for g in opt.param_groups:
                    self.groups.append((g, {k: copy.copy(v) for k, v in g.items() if k != "params"}))
                    for p in g["params"]:
                        self.params.setdefault(p, p.detach().clone())
                for leaf in leaf_optimizers(opt):
                    saved = {p: {k: _clone(v) for k, v in st.items()} for p, st in leaf.state.items()}
                    self.states.append((leaf, saved))

    @torch.no_grad()
    def restore(self) -> None:
        for p, value in self.params.items():
            p.copy_(value)
        for leaf, saved in self.states:
            for p in [p for p in leaf.state if p not in saved]:
                del leaf.state[p]
            for p, st in saved.items():
                live = leaf.state[p]
                live.clear()
                live.update({k: _clone(v) for k, v in st.items()})
        _restore_groups([g for g, _ in self.groups], [e for _, e in self.groups])


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


class _Labels:
    """``labels[i]``: "parameter <name>" or "optimizer state '<key>' of <name>", named on demand."""

    def __init__(self, pl_module: "pl.LightningModule", owners: list[tuple[Tensor, Optional[str]]]) -> None:
        self._module, self._owners = pl_module, owners
        self._names: Optional[dict[int, str]] = None

    def __getitem__(self, i: int) -> str:
        if self._names is None:
            self._names = _names(self._module)
        p, key = self._owners[i]
        name = self._names.get(id(p), "unnamed")
        return f"parameter {name}" if key is None else f"optimizer state {key!r} of {name}"


def _message(where: str, step: int, found: list[str], total: int, tail: str) -> str:
    more = f" and {len(found) - _SHOW} more" if len(found) > _SHOW else ""
    # checks around an update name it by global_step before it; the others by the steps taken
    when = "trainer.global_step before the update" if where.startswith(("gradient", "update", "optimizer state")) \
        else "trainer.global_step, the optimizer steps taken"
    return (f"non-finite {where} at step {step} ({when}): "
            f"{', '.join(found[:_SHOW])}{more} (of {total} tensors checked). {tail} "
            "Lower the learning rate, add warmup or gradient clipping, or use NonFiniteGuard(action='skip' or 'stop').")


def _unique(path: Path) -> Path:
    candidate, version = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
        version += 1
    return candidate


@rank_zero_only
def _log(trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)

