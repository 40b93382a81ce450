"""``StabilityMonitor``: early warnings of training instability, after the small-scale-proxies study.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322) trace two instabilities to quantities that can be watched
while training:

* **attention-logit growth**: the pre-softmax logits ``s · q·k`` grow until the attention
  entropy collapses (cured by QK-LayerNorm) — logged as the max logit per attention layer;
* **output-logit divergence**: the log-partition ``log Z = logsumexp(logits)`` drifts far from 0
  (cured by z-loss, ``1e-4 · log² Z``, PaLM) — logged as the mean ``log Z`` and the RMS of the
  output logits;

and they relate instability to the size of the updates — logged as the relative update
``‖ΔW‖ / ‖W‖`` of every parameter over one optimizer step. Loss spikes (the loss above
``spike_threshold`` times the median of the recent losses) are counted and logged.

Everything but the spike check runs on monitored steps only (every ``every_n_steps``): the
attention modules' ``record_max_logit`` flag, the readout's forward hook and the weight snapshot
are switched on for those steps and off in between, so the other steps cost nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ..params import readout_module_name
from .health import module_roles

__all__ = ["StabilityMonitor", "LossSpikeDetector", "logit_stats"]


def logit_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean of logits², mean over positions of logsumexp(logits))`` in float32, on device.

    The RMS of the logits is the square root of the first; the second is the mean log-partition
    ``log Z`` that z-loss pushes towards 0.
    """
    z = logits.detach().float()
    return z.pow(2).mean(), torch.logsumexp(z, dim=-1).mean()


class LossSpikeDetector:
    """A loss is a spike when it exceeds ``threshold`` times the median of the last ``window``
    finite losses (once ``warmup`` of them are known), or when it is not finite.

    A running median ignores the spikes themselves (unlike a mean) and a steadily falling loss
    never triggers it. Spikes enter the window, so a lasting jump stops counting after about
    half a window. ``update(loss)`` returns ``loss / median`` for a spike, else None.
    """

    def __init__(self, threshold: float = 1.3, window: int = 50, warmup: int = 10) -> None:
        self.threshold, self.warmup = threshold, warmup
        self.history: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> float | None:
        if not math.isfinite(loss):
            return math.nan
        ratio = None
        if len(self.history) >= self.warmup:
            reference = statistics.median(self.history)
            if reference > 0 and loss > self.threshold * reference:
                ratio = loss / reference
        self.history.append(loss)
        return ratio


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


class StabilityMonitor(Callback):
    """Max attention logit per layer, output-logit RMS and log Z, relative updates, loss spikes.

    Args:
        every_n_steps: monitor optimizer steps 0, N, 2N, ... (the cost falls on those steps only:
            on the demo model on a CPU a monitored step takes about 1.7 times a plain one, so the
            default 250 costs about 0.3 % of training time; other steps pay a few microseconds).
        spike_threshold: a step's loss above this factor times the running median is a spike (> 1).
        spike_window: number of recent step losses whose median is the reference.
        spike_warmup: steps seen before spikes are detected (≤ ``spike_window``).
        attention: record the max attention logit of every module with a ``record_max_logit``
            attribute (the reference models' attention layers; the forward stores ``max_logit``).
        logits: hook the module producing the logits for their RMS and mean ``log Z``.
        relative_updates: snapshot the weights before the optimizer step of monitored steps and
            log ``‖ΔW‖/‖W‖`` per parameter (a transient copy of the trainable weights). ``None``
            (default): on unless a :class:`~lightning_optlab.callbacks.PreconditionerHealth` is
            attached, which logs the same ratio as ``health/<role>/update_to_weight`` (each quantity
            is logged once, under one name); ``True`` measures it here as well.
        readout: name of the module whose output is the logits (``"model.lm_head"``); default:
            the module declaring ``optlab_readout`` (the model), else the readout layer by the
            rule of :mod:`lightning_optlab.params`.
        per_layer: log the per-layer keys (max logit per attention layer, relative update per
            weight matrix) as well as the aggregates.

    Logged keys (``stability/...``): ``attn_max_logit`` and ``attn_max_logit/<module>``,
    ``logit_rms``, ``log_z_mean``, ``update_ratio/<weight matrix>``, ``update_ratio_role/<role>``
    (roles of :mod:`lightning_optlab.params`), ``update_ratio_max`` (over every parameter),
    ``loss_spike_ratio`` (at each spike's step) and ``spike_count``. Statistics of a step
    with gradient accumulation cover all its micro-batches. Spikes are checked without reading
    the loss on every step (no device sync): the step losses are gathered and checked on
    monitored steps, every ``every_n_steps`` steps and at the end, and logged at their own steps.
    Under DDP, rank zero's own losses and statistics are logged. For acting on a spike (stop,
    skip the batch on resume) combine with Lightning's ``SpikeDetection``.

    Example:
        >>> trainer = L.Trainer(callbacks=[StabilityMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 250,
        spike_threshold: float = 1.3,
        spike_window: int = 50,
        spike_warmup: int = 10,
        attention: bool = True,
        logits: bool = True,
        relative_updates: bool | None = None,
        readout: str | None = None,
        per_layer: bool = True,
    ) -> None:
        super().__init__()
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("spike_window", spike_window, 1)
        _check_int("spike_warmup", spike_warmup, 1)
        if spike_warmup > spike_window:
            raise ValueError(f"spike_warmup ({spike_warmup}) must be ≤ spike_window ({spike_window})")
        if isinstance(spike_threshold, bool) or not isinstance(spike_threshold, (int, float)) or not 1 < spike_threshold < math.inf:
            raise ValueError(f"spike_threshold must be a factor > 1 (e.g. 1.3), got {spike_threshold!r}")
        if readout is not None and (not isinstance(readout, str) or not readout):
            raise ValueError(f"readout must be a module name such as 'model.lm_head' or None, got {readout!r}")
        self.every_n_steps = every_n_steps
        self.spike_threshold = float(spike_threshold)
        if relative_updates is not None and not isinstance(relative_updates, bool):
            raise ValueError(f"relative_updates must be True, False or None (auto), got {relative_updates!r}")
        self.attention, self.logits, self.relative_updates = bool(attention), bool(logits), relative_updates
        self._measure_updates = bool(relative_updates)
        self.readout, self.per_layer = readout, bool(per_layer)
        self.detector = LossSpikeDetector(self.spike_threshold, spike_window, spike_warmup)
        self.spike_count = 0
        #: ``(logged step, loss, loss / median)`` of every spike seen
        self.spikes: list[tuple[int, float, float]] = []
        #: ``(logged step, micro-batch losses, loss scale)`` not yet checked for spikes
        self._pending: list[tuple[int, list[Tensor] | list[float], int]] = []
        self._attn: list[tuple[str, nn.Module]] = []
        self._readout_module: nn.Module | None = None
        self._reset_step()
        self._collecting = False
        self._active = False
        self._hook: Any = None
        self._seen_global_step = 0
        self._roles: dict[str, str] = {}
        self._param_ndim: dict[str, int] = {}
        self._state_key = self._generate_state_key(every_n_steps=every_n_steps, spike_threshold=self.spike_threshold)

    def _reset_step(self) -> None:
        self._losses: list[Tensor] = []
        self._max_logit: dict[str, Tensor] = {}
        self._sq_sum: Tensor | float = 0.0
        self._lse_sum: Tensor | float = 0.0
        self._logit_n = 0
        self._snapshot: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._state_key  # computed once: Lightning reads it at every hook call

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._seen_global_step = trainer.global_step
        self._attn = [(n, m) for n, m in pl_module.named_modules() if hasattr(m, "record_max_logit")]
        if self.attention and not self._attn:
            rank_zero_warn("StabilityMonitor: no module has a `record_max_logit` attribute, so no attention "
                           "logits are logged (the reference models' attention layers have one)")
        self._readout_module = self._find_readout(pl_module) if self.logits else None
        self._measure_updates = self.relative_updates
        if self._measure_updates is None:  # auto: PreconditionerHealth logs the ratio (update_to_weight)
            from .health import PreconditionerHealth

            self._measure_updates = not any(isinstance(cb, PreconditionerHealth) for cb in trainer.callbacks)
        if self._measure_updates:
            self._roles = module_roles(pl_module)
            self._param_ndim = {n: p.ndim for n, p in pl_module.named_parameters() if p.requires_grad}

    def _find_readout(self, pl_module: "pl.LightningModule") -> nn.Module | None:
        """The module whose output is the logits: ``readout`` if given, else the module that
        declares ``optlab_readout`` (the model: its output includes any logit multiplier), else
        the readout layer by the rule of :mod:`lightning_optlab.params`."""
        if self.readout is None:
            for _, module in pl_module.named_modules():
                # the declaring class itself, not a wrapper forwarding attributes (torch.compile's
                # OptimizedModule forwards getattr to the model it wraps)
                declared = getattr(type(module), "optlab_readout", None) or vars(module).get("optlab_readout")
                if isinstance(declared, str):
                    return module
        name = self.readout if self.readout is not None else readout_module_name(pl_module)
        if name is None:
            rank_zero_warn("StabilityMonitor: no readout module found; pass readout='<module name>'")
            return None
        try:
            return pl_module.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in pl_module.named_modules() if n][:8]
            raise ValueError(f"readout module {name!r} not found in the LightningModule; names look like {names}") from None

    def _set_active(self, on: bool) -> None:
        if on == self._active:
            return
        self._active = on
        if self.attention:
            for _, m in self._attn:
                m.record_max_logit = on
                m.max_logit = None
        if on and self._readout_module is not None:
            self._hook = self._readout_module.register_forward_hook(self._on_readout)
        elif not on and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_readout(self, module: nn.Module, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
        if isinstance(out, Tensor) and out.ndim >= 1:
            sq, lse = logit_stats(out)
            self._sq_sum, self._lse_sum, self._logit_n = self._sq_sum + sq, self._lse_sum + lse, self._logit_n + 1

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_active(False)
        self._collecting = False
        self._flush(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._set_active(False)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_active(False)  # validation forwards are not part of the monitored step

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_active(self._collecting)

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if not self._collecting and trainer.global_step % self.every_n_steps == 0:
            self._collecting = True
            self._set_active(True)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        # fires after backward and before the update: the weights still hold W
        if self._collecting and self._measure_updates and self._snapshot is None:
            self._snapshot = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach())  # read later, in _flush: no device sync per step
        if self._collecting and self.attention:
            for name, m in self._attn:
                value = getattr(m, "max_logit", None)
                if isinstance(value, Tensor):
                    prev = self._max_logit.get(name)
                    self._max_logit[name] = value.detach() if prev is None else torch.maximum(prev, value.detach())
                    m.max_logit = None
        if trainer.global_step == self._seen_global_step:
            return  # accumulating: the optimizer step is not done yet
        self._seen_global_step = trainer.global_step
        step = max(0, trainer.global_step - 1)  # where Lightning logs this step's training metrics
        if self._losses:
            # automatic optimization divides the loss by accumulate_grad_batches; undo it
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._pending.append((step, self._losses, scale))
        monitored = self._collecting
        if monitored:
            self._set_active(False)
            self._collecting = False
            self._log(trainer, self._step_metrics(pl_module), step)
        if monitored or len(self._pending) >= self.every_n_steps:
            self._flush(trainer)
        self._reset_step()

    def _step_metrics(self, pl_module: "pl.LightningModule") -> dict[str, float]:
        names: list[str] = []
        values: list[Tensor] = []
        for n, v in self._max_logit.items():
            names.append(f"attn/{n}")
            values.append(v)
        if self._logit_n:
            names += ["logit_rms", "log_z_mean"]
            values += [torch.sqrt(self._sq_sum / self._logit_n), self._lse_sum / self._logit_n]
        if self._snapshot is not None:
            params = dict(pl_module.named_parameters())
            for n, old in self._snapshot.items():
                old32 = old.float()
                names += [f"dw/{n}", f"w/{n}"]
                values += [torch.linalg.vector_norm(params[n].detach().float() - old32), torch.linalg.vector_norm(old32)]
        if not values:
            return {}
        # an FSDP2 weight's norm is a DTensor (a partial sum per shard): every rank runs this, so
        # full_tensor() reduces it to the logical parameter's norm
        values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
        host = dict(zip(names, torch.stack([v.reshape(()).float().cpu() for v in values]).tolist()))  # one transfer
        out: dict[str, float] = {f"stability/{k}": host[k] for k in ("logit_rms", "log_z_mean") if k in host}
        attn = {f"stability/attn_max_logit/{k[5:]}": v for k, v in host.items() if k.startswith("attn/")}
        if attn:
            out["stability/attn_max_logit"] = max(attn.values())
        if self._snapshot is not None:
            out.update(self._update_metrics(host))
        if self.per_layer:
            out.update(attn)
        return out

    def _update_metrics(self, host: dict[str, float]) -> dict[str, float]:
        """``‖ΔW‖/‖W‖`` per weight matrix (per layer), per role over all its parameters
        (``sqrt(Σ‖ΔW‖²) / sqrt(Σ‖W‖²)``), and the largest over all parameters with ``‖W‖ > 0``."""
        out: dict[str, float] = {}
        role_dw: dict[str, float] = {}
        role_w: dict[str, float] = {}
        largest = -math.inf
        for name, shape_ndim in self._param_ndim.items():
            dw, w = host.get(f"dw/{name}"), host.get(f"w/{name}")
            if dw is None or w is None:
                continue
            role = self._roles.get(name, "hidden")
            role_dw[role] = role_dw.get(role, 0.0) + dw * dw
            role_w[role] = role_w.get(role, 0.0) + w * w
            if w > 0:  # zero-initialized biases have no ratio
                largest = max(largest, dw / w)
                if self.per_layer and shape_ndim >= 2:
                    out[f"stability/update_ratio/{name}"] = dw / w
        for role, w2 in role_w.items():
            if w2 > 0:
                out[f"stability/update_ratio_role/{role}"] = math.sqrt(role_dw[role] / w2)
        if largest > -math.inf:
            out["stability/update_ratio_max"] = largest
        return out

    # ------------------------------------------------------------------ spikes
    def _flush(self, trainer: "pl.Trainer") -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        spikes: list[tuple[int, float]] = []
        for step, values, scale in pending:
            loss = sum(float(v) for v in values) * scale / len(values)
            ratio = self.detector.update(loss)
            if ratio is not None:
                self.spike_count += 1
                self.spikes.append((step, loss, ratio))
                spikes.append((step, ratio))
        for step, ratio in spikes:
            self._log(trainer, {"stability/loss_spike_ratio": ratio}, step)
        self._log(trainer, {"stability/spike_count": float(self.spike_count)}, pending[-1][0])

    def _log(self, trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.detector.history), "spike_count": self.spike_count,
            "spikes": [list(s) for s in self.spikes],
            "pending": [(step, sum(float(v) for v in vals) * scale / len(vals)) for step, vals, scale in self._pending],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.history.clear()
        self.detector.history.extend(float(x) for x in state_dict.get("history", []))
        self.spike_count = int(state_dict.get("spike_count", 0))
        self.spikes = [(int(s), float(l), float(r)) for s, l, r in state_dict.get("spikes", [])]
        self._pending = [(int(s), [float(v)], 1) for s, v in state_dict.get("pending", [])]
