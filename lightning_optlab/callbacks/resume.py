"""Resuming safely: checkpoints written atomically and read through the pack's loader, and a resume
that refuses changed settings instead of ignoring them.

* :class:`SafeCheckpointIO` is Lightning's ``CheckpointIO`` with :func:`~lightning_optlab.checkpoint.
  save_checkpoint_atomic` (temp file in the same folder, fsync, rename; stale temp files of killed
  writers removed) and :func:`~lightning_optlab.checkpoint.load_checkpoint` (weights only unless
  ``trainer.fit`` is given ``weights_only`` false, and a damaged file named as such).
* :class:`ResumeCheck` compares, when ``fit`` resumes from ``ckpt_path``, the model, the data and
  the optimizer settings of the run with those saved in the checkpoint. Any difference is refused
  with the list of differences (old → new). With ``override_optimizer=True`` differences of the
  optimizer's hyperparameters and schedule (not of the model, the data, or which optimizer it is)
  are applied to the restored optimizer's param groups and scheduler instead, and reported.

``optlab fit`` and ``optlab sweep`` install both.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from ..checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint_atomic

__all__ = ["SafeCheckpointIO", "ResumeCheck", "ResumeMismatchError", "resume_differences"]

#: data settings that do not change what is trained on, nor where a resume continues
_DATA_IGNORED = {"num_workers", "work_dir", "allow_download", "val_batches", "_instantiator", "_class_path"}
#: optimizer settings an override may change (the optimizer itself and its grouping stay)
_OPT_FIXED = {"name", "mix", "mup", "role_patterns"}


class ResumeMismatchError(ValueError):
    """``fit`` was asked to resume a checkpoint with settings that differ from the checkpoint's."""


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically in the target folder and loads through the pack's
    loader (weights only unless ``trainer.fit`` is given ``weights_only`` false,
    e.g. ``optlab fit --weights_only false``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: Lightning's own
            return
        save_checkpoint_atomic(checkpoint, path)

    def __init__(self) -> None:
        super().__init__()
        #: called with ``(path, checkpoint)`` right after a load, before Lightning restores anything
        self.on_loaded: list[Callable[[Path, dict[str, Any]], None]] = []

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        remove_stale_temp_files(Path(path).parent)  # partial files of a writer killed mid-save
        checkpoint = load_checkpoint(path, trust=weights_only is False, map_location=map_location,
                                     trust_hint="--weights_only false (in Python: trainer.fit with weights_only set to False)")
        for listener in list(self.on_loaded):
            listener(Path(path), checkpoint)
        return checkpoint


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """A nested mapping as ``{"a.b": leaf}``; tuples become lists (YAML gives lists, dataclasses tuples)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        value = [_flat(v, "") if isinstance(v, Mapping) or dataclasses.is_dataclass(v) else
                 (list(v) if isinstance(v, tuple) else v) for v in value]
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0) or (a != a and b != b)
    return a == b


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: set[str] = frozenset(),
          only_common: bool = False) -> list[tuple[str, Any, Any]]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        field_name = k.split(".")[1] if "." in k else k  # "data.num_workers" -> "num_workers"
        if field_name in ignore:
            continue
        if only_common and (k not in old or k not in new):
            continue
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if not _same(a, b):
            out.append((k, a, b))
    return out


def _model_fields(spec: Any) -> dict[str, Any] | None:
    """The resolved model config of a ``CausalLMModule`` model spec (preset name or mapping), flattened."""
    if not isinstance(spec, (str, Mapping)):
        return None
    from ..models.presets import resolve_config

    try:
        config = resolve_config(dict(spec) if isinstance(spec, Mapping) else spec)
    except (ValueError, KeyError, TypeError):
        return _flat(spec if isinstance(spec, Mapping) else {"preset": spec}, "model")
    return _flat(dataclasses.asdict(config), "model")


def _spec_record(spec: Any) -> dict[str, Any] | None:
    if spec is None or not dataclasses.is_dataclass(spec):
        return None
    return _flat(dataclasses.asdict(spec), "optimizer")


def resume_differences(checkpoint: Mapping[str, Any], module: pl.LightningModule,
                       datamodule: Any = None) -> list[tuple[str, Any, Any]]:
    """Every setting of ``module``/``datamodule`` that differs from what ``checkpoint`` was trained with,
    as ``(dotted name, old, new)``: the model's resolved config, the data's settings (those that
    change the token stream) and the optimizer's spec (as :class:`ResumeCheck` records it; for a
    checkpoint without that record, the schedule saved by the LR scheduler)."""
    diffs: list[tuple[str, Any, Any]] = []
    saved_model = (checkpoint.get("hyper_parameters") or {}).get("model")
    asked_model = getattr(module, "hparams", {}).get("model") if hasattr(module, "hparams") else None
    old_m, new_m = _model_fields(saved_model), _model_fields(asked_model)
    if old_m is not None and new_m is not None:
        asked_vocab = isinstance(asked_model, Mapping) and "vocab_size" in asked_model
        diffs += _diff(old_m, new_m, ignore=set() if asked_vocab else {"vocab_size"})
    saved_data = checkpoint.get("datamodule_hyper_parameters")
    asked_data = getattr(datamodule, "hparams", None)
    if isinstance(saved_data, Mapping) and asked_data is not None:
        diffs += _diff(_flat(dict(saved_data), "data"), _flat(dict(asked_data), "data"), ignore=_DATA_IGNORED,
                       only_common=True)
    new_o = _spec_record(getattr(module, "spec", None))
    old_o = (checkpoint.get("callbacks") or {}).get(ResumeCheck.__qualname__, {}).get("optimizer")
    if new_o is not None and old_o is not None:
        diffs += _diff(old_o, new_o)
    elif new_o is not None:  # an older checkpoint: compare what its LR scheduler saved
        scheds = checkpoint.get("lr_schedulers") or []
        lambdas = (scheds[0].get("lr_lambdas") or [None])[0] if scheds and isinstance(scheds[0], Mapping) else None
        if isinstance(lambdas, Mapping):
            diffs += _diff(_flat(dict(lambdas), "optimizer"), {k: new_o.get(k) for k in _flat(dict(lambdas), "optimizer")})
    return diffs


def _format(diffs: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {old!r} → {new!r}" for k, old, new in diffs)


class ResumeCheck(Callback):
    """Refuse a ``fit`` resume whose settings differ from the checkpoint's; optionally apply optimizer changes.

    Lightning restores the checkpoint's weights, optimizer state and LR schedule whatever the config
    now says, so a changed width, learning rate, betas, weight decay or schedule would otherwise be
    ignored without a word. Under :class:`SafeCheckpointIO` this callback compares right after the
    checkpoint is loaded, before anything is restored (with another ``CheckpointIO``, in
    ``on_load_checkpoint``: after the weights, before the optimizer and the schedule).

    Args:
        override_optimizer: apply differences of the optimizer's hyperparameters and schedule (lr,
            betas, eps, weight_decay, hparams, per-role overrides, schedule, warmup_steps,
            total_steps, min_lr_ratio, decay_fraction) to the restored optimizer and scheduler,
            keeping their state (moments, step counts), and report them. The optimizer itself, its
            mix and μP, the model and the data are never overridden.

    The optimizer's settings are saved in this callback's state, so the check covers them from the
    first checkpoint written with it.
    """

    def __init__(self, override_optimizer: bool = False) -> None:
        self.override_optimizer = bool(override_optimizer)
        self._record: dict[str, Any] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._checked = False
        self._module: Any = None
        self._datamodule: Any = None
        self.applied: list[tuple[str, Any, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        record = _spec_record(getattr(pl_module, "spec", None))
        self._record = {"optimizer": record} if record is not None else {}
        self._checked, self._pending = stage != "fit", []
        self._module, self._datamodule = pl_module, trainer.datamodule
        io = trainer.strategy.checkpoint_io
        if stage == "fit" and isinstance(io, SafeCheckpointIO) and self._check not in io.on_loaded:
            io.on_loaded.append(self._check)  # compare before the weights are restored

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafeCheckpointIO) and self._check in io.on_loaded:
            io.on_loaded.remove(self._check)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self._checked:  # another CheckpointIO: compare now (still before optimizer and schedule restore)
            self._check(Path(str(trainer.ckpt_path)), checkpoint)

    def _check(self, path: Path, checkpoint: dict[str, Any]) -> None:
        if self._checked:
            return
        self._checked = True
        diffs = resume_differences(checkpoint, self._module, self._datamodule)
        if not diffs:
            return
        fixed = [d for d in diffs if not d[0].startswith("optimizer.") or d[0].split(".")[1] in _OPT_FIXED]
        if self.override_optimizer and not fixed:
            self._pending = diffs
            return
        hint = ("model, data and the optimizer's identity cannot change on a resume"
                if self.override_optimizer else
                "resume with the checkpoint's settings (drop the changed options); for optimizer hyperparameters "
                "and the schedule only, pass --resume_override optimizer (ResumeCheck(override_optimizer=True)) "
                "to apply them to the restored optimizer")
        raise ResumeMismatchError(
            f"resuming from {path} refused: the run's settings differ from the checkpoint's (old → new):\n"
            f"{_format(fixed if self.override_optimizer else diffs)}\n"
            f"A resume continues the saved run exactly: {hint}; or start a new run without --ckpt_path.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pending:
            return
        self._apply(trainer, pl_module)
        self.applied, self._pending = self._pending, []
        msg = ("resume: applied changed optimizer settings to the restored optimizer and schedule (old → new):\n"
               + _format(self.applied))
        if trainer.is_global_zero:
            print(msg, flush=True)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rebuild the optimizer and scheduler the new spec describes and copy their group settings and
        schedule onto the restored ones (their state, step counts included, is kept)."""
        from ..configure import configure

        fresh = configure(pl_module, pl_module.spec)
        new_opt = fresh["optimizer"]
        new_sched = fresh["lr_scheduler"]["scheduler"] if isinstance(fresh.get("lr_scheduler"), Mapping) else None
        opt = trainer.optimizers[0]
        if len(opt.param_groups) != len(new_opt.param_groups) or any(
                [id(p) for p in a["params"]] != [id(p) for p in b["params"]]
                for a, b in zip(opt.param_groups, new_opt.param_groups)):
            raise ResumeMismatchError(
                "--resume_override optimizer: the new settings group the parameters differently from the "
                f"checkpoint's ({len(opt.param_groups)} groups saved, {len(new_opt.param_groups)} now); "
                "resume with the saved per-role overrides, or start a new run")
        for group, new_group in zip(opt.param_groups, new_opt.param_groups):
            group.update({k: v for k, v in new_group.items() if k != "params"})
        configs = trainer.lr_scheduler_configs
        if configs and new_sched is not None:
            sched = configs[0].scheduler
            sched.base_lrs = list(new_sched.base_lrs)
            if hasattr(sched, "lr_lambdas") and hasattr(new_sched, "lr_lambdas"):
                sched.lr_lambdas = list(new_sched.lr_lambdas)
                for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * factor(sched.last_epoch)
                sched._last_lr = [g["lr"] for g in opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return dict(self._record)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the record describes the run as it is now (after any override)."""
