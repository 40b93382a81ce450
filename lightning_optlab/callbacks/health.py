"""``PreconditionerHealth``: what the optimizer does to each layer, logged while it trains.

Every ``every_n_steps`` optimizer steps the callback asks the optimizer's ``health()`` (the
protocol of :mod:`lightning_optlab.optim.health`; torch's own SGD/Adam/AdamW/Adagrad are read
by :func:`~lightning_optlab.optim.health.torch_optimizer_health`) and logs

* per parameter: every numeric statistic the optimizer reports (effective-LR quantiles, eps
  fraction, update RMS, update/weight ratio, Sophia's clip fraction, Adalayer's block effective
  LRs, and whatever a matrix method adds: condition numbers, staleness, fallback counts, ...),
  plus the gradient norm ``||g||_2`` read just before that step's update;
* per role (embedding, hidden, readout, norm, bias): the mean over the role's parameters of each
  statistic, except ``*_min`` (the minimum) and ``*_max`` (the maximum) keys, and the role's
  gradient norm ``sqrt(sum_p ||g_p||^2)``;
* the readout's per-logit effective learning rates: quantiles over the rows of the readout
  weight (the weights feeding one logit) of ``mean_row(lr / (sqrt(v_hat) + eps))`` for
  Adam-like state, or Adalayer's per-row block effective LRs.

At the end of fit it writes a PNG of effective-LR quantiles per layer over training, the view
of Zhao et al. 2025 ("Deconstructing What Makes a Good Optimizer for Autoregressive Language
Models", ICLR 2025), with the readout rows in their own panel.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from ..optim.base import iter_leaf_optimizers
from ..optim.health import QUANTILES, named_params, quantile_stats, torch_optimizer_health
from ..params import classify_parameters

__all__ = ["PreconditionerHealth", "aggregate_by_role", "describe_optimizers", "effective_lr_tensor", "figure_title",
           "plot_effective_lr"]

_Q_KEYS = tuple(k for k, _ in QUANTILES)  # min, q05, q50, q95, max
_TORCH_READABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)
# Beyond this many weight matrices the plot draws one panel per name pattern (layers as curves).
_MAX_PANELS = 48


def module_roles(pl_module: Any) -> dict[str, str]:
    """Parameter roles of ``pl_module`` as the configurator decided them: the optimizer spec's
    ``role_patterns`` (when the module has a ``spec``, as ``CausalLMModule`` does) over the defaults."""
    spec = getattr(pl_module, "spec", None)
    return dict(classify_parameters(pl_module, getattr(spec, "role_patterns", None) or None))


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer behind Lightning's ``LightningOptimizer`` wrapper (or ``opt``)."""
    while isinstance(opt, LightningOptimizer):
        opt = opt.optimizer
    return opt


def leaf_optimizers(opt: Any) -> list[Any]:
    """``opt`` itself, or the children of a mix (``OptimizerMix``: a ``children`` list), recursively."""
    return list(iter_leaf_optimizers(opt))


def _health_keys(opt: Any) -> dict[str, tuple[Tensor, dict[str, Any], Any]]:
    """Map the parameter names used in ``opt.health()`` keys to ``(param, group, leaf optimizer)``.

    Follows :meth:`OptimizerMix.health`: unnamed parameters of a child are prefixed by its label.
    """
    children = getattr(opt, "children", None)
    if isinstance(children, (list, tuple)) and children and all(isinstance(c, torch.optim.Optimizer) for c in children):
        labels = list(getattr(opt, "child_names", [type(c).__name__.lower() for c in children]))
        out: dict[str, tuple[Tensor, dict[str, Any], Any]] = {}
        for label, child in zip(labels, children):
            sub = _health_keys(child)
            if not all("param_names" in g for g in child.param_groups):
                sub = {f"{label}:{k}": v for k, v in sub.items()}
            out.update(sub)
        return out
    return {name: (p, group, opt) for name, p, group in named_params(opt)}


def optimizer_health(opt: Any) -> Optional[dict[str, float]]:
    """``opt.health()``, torch's own optimizers read from their state, else ``None``."""
    if callable(getattr(opt, "health", None)):
        return opt.health()
    if isinstance(opt, _TORCH_READABLE):
        return torch_optimizer_health(opt)
    return None


def optimizer_label(group: Mapping[str, Any], leaf: Any) -> str:
    """The optimizer of a param group: the part after ``/`` of its ``name`` (``"hidden/muon"``, as the
    configurator names groups), else the optimizer class name in lower case."""
    name = group.get("name")
    if isinstance(name, str) and "/" in name:
        return name.rsplit("/", 1)[1]
    return type(leaf).__name__.lower()


def describe_optimizers(optimizer_of: Mapping[str, tuple[str, float]], roles: Mapping[str, str]) -> str:
    """One line naming each optimizer, its learning rates and the roles it trains, e.g.
    ``"muon lr 0.02 (hidden) / adamw lr 0.003 (embedding, norm, readout)"``.

    ``optimizer_of`` maps parameter names to ``(optimizer label, learning rate)``; the rate is the
    group's ``initial_lr`` (the schedule's peak) where an LR scheduler set one.
    """
    by_opt: dict[str, dict[float, set[str]]] = {}
    for name, (label, lr) in optimizer_of.items():
        by_opt.setdefault(label, {}).setdefault(lr, set()).add(roles.get(name, "other"))
    parts = []
    for label, lrs in by_opt.items():
        rates = ", ".join(f"lr {lr:.3g} ({', '.join(sorted(rs))})" for lr, rs in sorted(lrs.items(), reverse=True))
        parts.append(f"{label} {rates}")
    return " / ".join(parts)


def aggregate_by_role(per_param: Mapping[str, Mapping[str, float]], roles: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per-role summary of per-parameter statistics: ``{role: {stat: value}}``.

    ``*_min`` keys take the minimum over the role's parameters, ``*_max`` keys the maximum, every
    other key the mean over the parameters that report it. Parameters without a role are "other".
    """
    buckets: dict[str, dict[str, list[float]]] = {}
    for name, stats in per_param.items():
        role = roles.get(name, "other")
        for stat, value in stats.items():
            buckets.setdefault(role, {}).setdefault(stat, []).append(float(value))
    out: dict[str, dict[str, float]] = {}
    for role, stats in buckets.items():
        agg = {}
        for stat, values in stats.items():
            if stat.endswith("_min"):
                agg[stat] = min(values)
            elif stat.endswith("_max"):
                agg[stat] = max(values)
            else:
                agg[stat] = sum(values) / len(values)
        out[role] = agg
    return out


@torch.no_grad()
def effective_lr_tensor(opt: Any, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
    """Per-coordinate effective learning rate of ``p``, as the optimizer declares it.

    The pack's optimizers answer through ``effective_lr(p, group, state)`` (AdamW, Adagrad, SGD,
    Adafactor with a fixed learning rate, Sophia, and any registered optimizer that implements
    it); torch's own Adam/AdamW/Adagrad/SGD are read from their state. These mirror the
    optimizers' ``health()`` (a test checks they agree). Anything else gives ``None``.
    """
    if not state or "lr" not in group:
        return None
    declared = getattr(opt, "effective_lr", None)
    if callable(declared):
        return declared(p, group, state)
    lr, eps = float(group["lr"]), group.get("eps")
    step = state.get("step", 0)
    t = float(step.item() if isinstance(step, Tensor) else step)
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg_sq" in state and t > 0:
        return lr / ((state["exp_avg_sq"].float() / (1 - group["betas"][1] ** t)).sqrt() + eps)
    if isinstance(opt, torch.optim.Adagrad) and "sum" in state:
        return lr / (1 + (t - 1) * group.get("lr_decay", 0.0)) / (state["sum"].float().sqrt() + eps)
    if isinstance(opt, torch.optim.SGD):
        return torch.full_like(p, lr, dtype=torch.float32)
    return None


class PreconditionerHealth(Callback):
    """Logs the optimizer's health statistics per parameter and per role every N optimizer steps.

    Args:
        every_n_steps: log after every N-th optimizer step (steps counted after gradient
            accumulation, like ``trainer.global_step``), and once more after the last step. On
            the demo model (CPU, one thread) one collection with its logging costs about 2 steps
            (``health()`` takes quantiles over every tensor; ``health/compute_seconds`` reports
            the computation), so the default 500 keeps the mean overhead near 0.4%, within the
            pack's 1% budget for all callbacks together; short runs want a smaller N.
        roles: log the per-role aggregates ``health/<role>/<stat>`` (default on: a few dozen tags).
        per_parameter: also log ``health_param/<parameter name>/<stat>`` (default off: every statistic of
            every parameter, hundreds of tags even for a small model; the figure is drawn per layer
            either way).
        histograms: with a ``TensorBoardLogger``, also add histograms of each parameter's
            gradient and of ``log10`` of its per-coordinate effective LR (where known).
        plot: write the effective-LR-per-layer figure at the end of fit.
        plot_path: where (default ``<trainer.log_dir or default_root_dir>/preconditioner_health.png``).

    Keys: ``health/<role>/<stat>``, ``health/<role>/grad_norm``, ``health/grad_norm``,
    ``health/readout_rows/eff_lr_<q>``, ``health/compute_seconds`` and the per-parameter
    ``health_param/<name>/<stat>``; the statistics of update N (``trainer.global_step`` = N) are
    logged at index N − 1, beside that update's ``train/loss`` (histograms too).
    The statistics describe the optimizer state after that step, with the learning rate the next
    step will use (the LR scheduler has stepped), i.e. the step the optimizer is about to take.
    Roles come from the param groups' ``"role"`` (the configurator's), else from
    :func:`lightning_optlab.params.classify_parameters`. Optimizers without ``health()`` (other
    than torch's SGD/Adam/AdamW/Adagrad) get gradient norms only, with one warning.

    Computed and logged on global rank zero only (under DDP the optimizer state is replicated;
    under FSDP each rank would see its shard, which is not supported). The recorded series is part
    of the callback's ``state_dict``, so a resumed run continues it (and its plot).

    Example:
        >>> trainer = L.Trainer(callbacks=[PreconditionerHealth(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        roles: bool = True,
        per_parameter: bool = False,
        histograms: bool = False,
        plot: bool = True,
        plot_path: Optional[str | Path] = None,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer ≥ 1, got {every_n_steps!r}")
        for flag, value in (("roles", roles), ("per_parameter", per_parameter), ("histograms", histograms), ("plot", plot)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if plot_path is not None and not str(plot_path).lower().endswith(".png"):
            raise ValueError(f"plot_path must name a .png file, got {str(plot_path)!r}")
        self.every_n_steps = every_n_steps
        self.roles = roles
        self.per_parameter = per_parameter
        self.histograms = histograms
        self.plot = plot
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.series: dict[str, Any] = _empty_series()
        self.last_metrics: dict[str, float] = {}
        self._grad_norms: dict[str, float] = {}
        self._grad_step = -1
        self._warned: set[str] = set()
        self._optimizer_of: dict[str, tuple[str, float]] = {}
        #: the PNG written at the end of the last fit (None before)
        self.written_plot: Optional[Path] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, roles=self.roles, per_parameter=self.per_parameter
        )

    # --- hooks ----------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        # global_step counts the steps already taken: this update makes it global_step + 1.
        step = trainer.global_step + 1
        many = trainer.world_size > 1  # every rank takes part (FSDP2 shards, owner-rank state)
        if (not trainer.is_global_zero and not many) or (step % self.every_n_steps != 0 and step != trainer.max_steps):
            return
        if self._grad_step != step:
            self._grad_norms, self._grad_step = {}, step
        names = _param_names(pl_module)
        params = [p for g in unwrap_optimizer(optimizer).param_groups for p in g["params"] if p.grad is not None]
        if params:
            sq = _grad_norms_squared(params, many)
            for p, n in zip(params, sq.sqrt().tolist()):
                self._grad_norms[names.get(id(p), f"param{len(self._grad_norms)}")] = n

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step > 0 and not self._recorded(step):
            self._collect(trainer, pl_module)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step > 0 and not self._recorded(trainer.global_step):
            self._collect(trainer, pl_module)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # trainer.log_dir is a broadcast under DDP/FSDP: ask on every rank here, never from rank zero alone
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.plot and trainer.is_global_zero:
            path = self.plot_path or self._folder(trainer) / "preconditioner_health.png"
            if self.series["steps"]:
                plot_effective_lr(self.series, path)
                self.written_plot = path

    def state_dict(self) -> dict[str, Any]:
        return {"series": self.series}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.series = state_dict.get("series", _empty_series())

    def _folder(self, trainer: "pl.Trainer") -> Path:
        folder = getattr(self, "_log_dir", None)
        return folder if folder is not None else Path(trainer.log_dir or trainer.default_root_dir)

    # --- collection -----------------------------------------------------------------------------

    def _recorded(self, step: int) -> bool:
        # every rank keeps _collected_step (only rank zero records the series): with many ranks all
        # of them must agree on whether to collect, which is a collective
        return getattr(self, "_collected_step", None) == step or (
            bool(self.series["steps"]) and self.series["steps"][-1] == step)

    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        many = trainer.world_size > 1
        if not trainer.is_global_zero and not many:
            return
        start = time.perf_counter()
        step = trainer.global_step
        self._collected_step = step
        names = _param_names(pl_module)
        per_param, roles, readout = self._per_parameter_stats(trainer, pl_module, names)
        if many:  # every rank computed what it holds; rank zero merges and logs
            per_param, roles, readout = _merge_over_ranks(per_param, roles, readout)
            if not trainer.is_global_zero:
                return
        grads = self._grad_norms if self._grad_step == step else {}
        for name, norm in grads.items():
            per_param.setdefault(name, {})["grad_norm"] = norm
        metrics: dict[str, float] = {}
        if self.per_parameter:
            for name, stats in per_param.items():
                metrics.update({f"health_param/{name}/{k}": v for k, v in stats.items()})
        if self.roles:
            no_grad = {n: {k: v for k, v in s.items() if k != "grad_norm"} for n, s in per_param.items()}
            for role, stats in aggregate_by_role(no_grad, roles).items():
                metrics.update({f"health/{role}/{k}": v for k, v in stats.items()})
            for role in sorted({roles.get(n, "other") for n in grads}):
                sq = sum(v * v for n, v in grads.items() if roles.get(n, "other") == role)
                metrics[f"health/{role}/grad_norm"] = math.sqrt(sq)
        if grads:
            metrics["health/grad_norm"] = math.sqrt(sum(v * v for v in grads.values()))
        if readout is not None:
            metrics.update({f"health/readout_rows/eff_lr_{k}": readout[i] for i, k in enumerate(_Q_KEYS)})
        self._record(step, per_param, roles, readout, pl_module)
        self.series["title"] = {"optimizer": describe_optimizers(self._optimizer_of, roles),
                                "run": _run_label(self._folder(trainer))}
        if self.histograms:
            self._add_histograms(trainer, pl_module, names, max(0, step - 1))  # the scalars' index
        metrics["health/compute_seconds"] = time.perf_counter() - start
        self.last_metrics = metrics
        # Lightning logs the training metrics of update k (train/loss) at index k - 1: same here
        _log(trainer, metrics, max(0, step - 1))

    def _per_parameter_stats(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", names: dict[int, str]
    ) -> tuple[dict[str, dict[str, float]], dict[str, str], Optional[list[float]]]:
        per_param: dict[str, dict[str, float]] = {}
        roles: dict[str, str] = {}
        fallback_roles: Optional[Mapping[str, str]] = None
        readout: Optional[list[float]] = None
        for raw in trainer.optimizers:
            opt = unwrap_optimizer(raw)
            try:
                stats = optimizer_health(opt)
            except RuntimeError as err:
                if "DTensor" not in str(err):
                    raise
                # every rank fails alike here (same parameters, same order), so no collective is left hanging
                self._warn_once("dtensor", f"{type(opt).__name__}.health() cannot compute on FSDP2 shards ({str(err)[:120]}); "
                                "PreconditionerHealth logs only gradient norms until the optimizer's health "
                                "statistics take DTensors (lightning_optlab.optim.health.quantile_stats)")
                stats = {}
            if stats is None:
                name = type(opt).__name__
                self._warn_once(name, f"{name} has no health(); PreconditionerHealth logs only its gradient norms")
                stats = {}
            keys = _health_keys(opt)
            for key, (p, group, leaf) in keys.items():
                name = names.get(id(p), key)
                self._optimizer_of[name] = (optimizer_label(group, leaf), float(group.get("initial_lr", group.get("lr", math.nan))))
                role = group.get("role")
                if role is None:
                    fallback_roles = fallback_roles if fallback_roles is not None else module_roles(pl_module)
                    role = fallback_roles.get(name, "other")
                roles[name] = role
            for full_key, value in stats.items():
                key, _, stat = full_key.rpartition("/")
                number = _as_float(value)
                if not key or number is None:
                    continue  # only numeric statistics are logged
                name = names.get(id(keys[key][0]), key) if key in keys else key
                per_param.setdefault(name, {})[stat] = number
            if readout is None and stats:
                readout = self._readout_rows(keys, names, roles, stats)
        return per_param, roles, readout

    def _readout_rows(self, keys: Mapping[str, Any], names: Mapping[int, str], roles: Mapping[str, str],
                      stats: Mapping[str, float]) -> Optional[list[float]]:
        """Quantiles over readout rows of each row's effective LR (block LRs for Adalayer)."""
        for key, (p, group, leaf) in keys.items():
            if roles.get(names.get(id(p), key)) != "readout" or p.dim() < 2:
                continue
            if f"{key}/block_eff_lr_q50" in stats:
                self.series["readout_kind"] = "per-row block eff. LR (Adalayer)"
                return [stats[f"{key}/block_eff_lr_{k}"] for k in _Q_KEYS]
            eff = effective_lr_tensor(leaf, p, group, leaf.state.get(p, {}))
            if eff is None:
                return None
            self.series["readout_kind"] = "row mean of per-coordinate eff. LR"
            rows = quantile_stats("r", eff.reshape(eff.shape[0], -1).mean(dim=1))
            return [rows[f"r_{k}"] for k in _Q_KEYS]
        return None

    def _record(self, step: int, per_param: Mapping[str, Mapping[str, float]], roles: Mapping[str, str],
                readout: Optional[list[float]], pl_module: "pl.LightningModule") -> None:
        s = self.series
        n_before = len(s["steps"])
        s["steps"].append(step)
        shapes = {n: p.dim() for n, p in pl_module.named_parameters()}
        for name, stats in per_param.items():
            if f"eff_lr_{_Q_KEYS[0]}" not in stats:
                continue
            if name not in s["eff_lr"]:
                s["eff_lr"][name] = [[math.nan] * len(_Q_KEYS) for _ in range(n_before)]
                s["meta"][name] = {"role": roles.get(name, "other"), "ndim": shapes.get(name, 2),
                                   "optimizer": self._optimizer_of.get(name, ("", 0.0))[0]}
            s["eff_lr"][name].append([stats.get(f"eff_lr_{k}", math.nan) for k in _Q_KEYS])
        for rows in s["eff_lr"].values():  # parameters that reported nothing this time
            if len(rows) < n_before + 1:
                rows.append([math.nan] * len(_Q_KEYS))
        s["readout_rows"].append(readout if readout is not None else [math.nan] * len(_Q_KEYS))

    @rank_zero_only
    def _add_histograms(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", names: Mapping[int, str], step: int
    ) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            self._warn_once("histograms", "histograms=True needs a TensorBoardLogger; none is attached")
            return
        leaves = [leaf for raw in trainer.optimizers for leaf in leaf_optimizers(unwrap_optimizer(raw))]
        for leaf, group, p in ((leaf, g, p) for leaf in leaves for g in leaf.param_groups for p in g["params"]):
            name = names.get(id(p), f"param{id(p)}")
            eff = effective_lr_tensor(leaf, p, group, leaf.state.get(p, {}))
            # under FSDP2: rank zero's shards (a DTensor's local part; gathering would need every rank)
            hists = {"grad": _local(p.grad.detach()).float() if p.grad is not None else None,
                     "log10_eff_lr": _local(eff).log10() if eff is not None else None}
            for key, values in hists.items():
                for lg in loggers if values is not None else []:
                    lg.experiment.add_histogram(f"health_hist/{name}/{key}", values.cpu(), step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _local(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank (FSDP2), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grad_norms_squared(params: list[Tensor], many: bool) -> Tensor:
    """``||g_p||^2`` of every parameter's whole gradient: for FSDP2 shards the sum over ranks of the
    local squares (one all-reduce); a plain tensor (DDP: all-reduced, the same on every rank) as it is."""
    grads = [p.grad.detach() for p in params]
    norms = torch._foreach_norm([_local(g) for g in grads])
    device = norms[0].device
    sq = torch.stack([n.float().to(device) for n in norms]).pow(2)
    if many and torch.distributed.is_available() and torch.distributed.is_initialized():
        sharded = torch.tensor([hasattr(g, "to_local") and any(not pl.is_replicate() for pl in g.placements)
                                for g in grads], device=device)
        if bool(sharded.any()):
            part = torch.where(sharded, sq, torch.zeros_like(sq))
            torch.distributed.all_reduce(part)
            sq = torch.where(sharded, part, sq)
    return sq.cpu()


def _merge_over_ranks(per_param: dict[str, dict[str, float]], roles: dict[str, str],
                      readout: Optional[list[float]]) -> tuple[dict[str, dict[str, float]], dict[str, str], Optional[list[float]]]:
    """Every rank's per-parameter statistics, merged in rank order (a key reported by several ranks:
    the lowest rank's). A parameter whose optimizer state lives on one owner rank only (the
    distributor of matrix preconditioners) is reported by that rank; replicated (DDP) or
    DTensor-reduced statistics are the same on every rank."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (per_param, roles, readout))
    merged: dict[str, dict[str, float]] = {}
    merged_roles: dict[str, str] = {}
    first_readout = None
    for rank_stats, rank_roles, rank_readout in gathered:
        for name, stats in rank_stats.items():
            target = merged.setdefault(name, {})
            for key, value in stats.items():
                target.setdefault(key, value)
        for name, role in rank_roles.items():
            merged_roles.setdefault(name, role)
        if first_readout is None:
            first_readout = rank_readout
    return merged, merged_roles, first_readout


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    return None


def _empty_series() -> dict[str, Any]:
    return {"steps": [], "eff_lr": {}, "meta": {}, "readout_rows": [], "readout_kind": ""}


def _run_label(folder: Path) -> str:
    """The run, as the last three parts of its log folder (``<sweep point>/lightning_logs/version_0``)."""
    return "/".join(folder.resolve().parts[-3:])


def _param_names(pl_module: "pl.LightningModule") -> dict[int, str]:
    return {id(p): n for n, p in pl_module.named_parameters()}


@rank_zero_only
def _log(trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def _pool(rows_per_tensor: list[list[list[float]]]) -> list[list[float]]:
    """Per step: the min of the minima, the mean of the inner quantiles, the max of the maxima."""
    pooled = []
    for rows in zip(*rows_per_tensor):
        cols = [[r[i] for r in rows if not math.isnan(r[i])] for i in range(len(_Q_KEYS))]
        mean = [sum(c) / len(c) if c else math.nan for c in cols]
        pooled.append([min(cols[0], default=math.nan), *mean[1:-1], max(cols[-1], default=math.nan)])
    return pooled


def _panel_specs(series: Mapping[str, Any]) -> list[tuple[str, str, list[list[list[float]]]]]:
    """``(title, role, curves)`` per panel; a curve is one tensor's per-step quantile rows.

    Matrices get a panel each (more than 48: one per name pattern, e.g. ``blocks.*.attn.q.weight``,
    with a curve per layer); vectors (norms, biases) are pooled per role.
    """
    eff, meta = series["eff_lr"], series["meta"]
    # a panel names the role and, where the series knows it, the optimizer that trains it ("hidden, muon")
    role = {n: ", ".join(x for x in (meta.get(n, {}).get("role", "other"), meta.get(n, {}).get("optimizer")) if x)
            for n in eff}
    matrices = [n for n in eff if meta.get(n, {}).get("ndim", 2) >= 2]
    panels: list[tuple[str, str, list[list[list[float]]]]] = []
    if len(matrices) <= _MAX_PANELS:
        panels += [(n, role[n], [eff[n]]) for n in matrices]
    else:
        groups: dict[str, list[str]] = {}
        for n in matrices:
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", n), []).append(n)
        panels += [(ns[0] if len(ns) == 1 else f"{p} ({len(ns)} layers, dark = first)", role[ns[0]], [eff[n] for n in ns])
                   for p, ns in groups.items()]
    vectors: dict[str, list[str]] = {}
    for n in eff:
        if n not in matrices:
            vectors.setdefault(role[n], []).append(n)
    for r, ns in vectors.items():
        title = ns[0] if len(ns) == 1 else f"{len(ns)} vectors pooled: min, mean quantiles, max"
        panels.append((title, r, [eff[ns[0]]] if len(ns) == 1 else [_pool([eff[n] for n in ns])]))
    if len({n.split(".", 1)[0] for n in eff}) == 1 and all("." in n for n in eff):  # e.g. the module's "model."
        prefix = next(iter(eff)).split(".", 1)[0] + "."
        panels = [(t[len(prefix):] if t.startswith(prefix) else t, r, c) for t, r, c in panels]
    if any(not math.isnan(r[2]) for r in series["readout_rows"]):
        panels.append((f"readout rows: {series['readout_kind']}", "readout rows", [series["readout_rows"]]))
    return panels


def figure_title(series: Mapping[str, Any]) -> str:
    """The figure's title: what it shows, then the optimizers with their learning rates and the run."""
    title = "Effective learning rate per layer: median, 5–95% and min–max over coordinates"
    info = series.get("title") or {}
    line = " · ".join(x for x in (info.get("optimizer"), f"run {info['run']}" if info.get("run") else "") if x)
    return f"{title}\n{line}" if line else title


def plot_effective_lr(series: Mapping[str, Any], path: str | Path) -> Path:
    """Write the effective-LR-per-layer figure of a recorded ``series`` to ``path`` (PNG).

    One panel per weight matrix, sharing a log y axis: the median, the 5–95% band and the
    min–max band of the per-coordinate effective learning rate against the optimizer step
    (several layers in a panel: one curve per layer, darker = deeper); norm and bias vectors
    pooled per role; the readout's per-row quantiles in the last panel. Non-positive values
    (a learning rate of 0 at the end of a schedule) are left out of the log axis.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the user's backend and figures are left alone
    from matplotlib.ticker import NullLocator

    steps = series["steps"]
    panels = _panel_specs(series)
    if not panels:
        raise ValueError("the series holds no effective-LR statistics to plot (did the optimizer report eff_lr_*?)")
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.4 * nrows + 1.7))  # + 1.7 in for the margins below
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    colors = {"embedding": "tab:green", "hidden": "tab:blue", "readout": "tab:red", "norm": "tab:purple",
              "bias": "tab:gray", "readout rows": "tab:orange"}
    for ax, (title, role, curves) in zip(axes.flat, panels):
        for i, rows in enumerate(curves):
            q = [[v if v > 0 else math.nan for v in col] for col in zip(*rows)]
            color = colors.get(role.split(",")[0], "tab:brown") if len(curves) == 1 else colormaps["viridis"](i / (len(curves) - 1))
            alpha = 1.0 if len(curves) == 1 else 0.3
            ax.fill_between(steps, q[0], q[4], color=color, alpha=0.15 * alpha, lw=0)
            ax.fill_between(steps, q[1], q[3], color=color, alpha=0.35 * alpha, lw=0)
            ax.plot(steps, q[2], color=color, lw=1.4, marker="o" if len(steps) == 1 else None)
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # hundreds of minor log ticks cost most of the drawing
        ax.set_title(f"{title}\n({role})" if role != "readout rows" else title, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    height = fig.get_figheight()
    fig.supxlabel("optimizer step", fontsize=9, y=0.15 / height)
    fig.supylabel("effective learning rate", fontsize=9)
    fig.suptitle(figure_title(series), fontsize=10, y=1 - 0.2 / height)
    # fixed margins: tight_layout measures every tick label and costs more than the drawing
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.7 / height, top=1 - 1.0 / height, hspace=0.55, wspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
