"""``WallClock``: where each optimizer step's time goes, tokens/s, MFU and time to target losses.

Optimizers are compared honestly in wall-clock, not steps: a preconditioner that halves the
steps but triples the step time loses. Per optimizer step (after gradient accumulation) the
callback splits the time into

* ``data``: between the end of the previous micro-batch and the start of this one (loading the
  next batch, the LR scheduler, loop bookkeeping and the batch-end hooks of callbacks placed
  after this one), validation excluded;
* ``fwd_bwd``: from ``on_train_batch_start`` to ``on_before_optimizer_step`` (the closure:
  ``training_step`` and ``backward``), summed over the micro-batches;
* ``optimizer``: from ``on_before_optimizer_step`` to the return of ``optimizer.step`` (gradient
  clipping and the update), with ``refresh`` inside it when the optimizer reports a
  preconditioner refresh through ``last_refresh_seconds``;
* ``other``: from the return of ``optimizer.step`` to ``on_train_batch_end``.

MFU is ``flops_per_token · tokens/s / peak FLOP/s`` per device (Chowdhery et al. 2022, PaLM,
appendix B), with the model's training FLOPs per token (``6N`` plus attention, Kaplan et al.
2020) and the dense peak of the device at the trainer's precision: Lightning's
``get_available_flops``, corrected for the devices it gets wrong (:data:`PEAK_FLOPS_CORRECTIONS`),
or the ``peak_flops`` argument. Tokens/s and MFU per logging interval are computed by Lightning's
``Throughput``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

__all__ = ["WallClock", "PEAK_FLOPS_CORRECTIONS", "peak_flops_for", "default_tokens_per_batch", "format_summary"]

#: the host clock; tests replace it (``monkeypatch.setattr(wallclock, "_now", fake)``)
_now: Callable[[], float] = time.perf_counter

#: Corrections to Lightning's :func:`~lightning.fabric.utilities.throughput.get_available_flops`
#: (lightning 2.6) for the devices it gets wrong or does not know: dense peak FLOP/s
#: ``(bf16/fp16, tf32, fp32)`` from NVIDIA's data sheets, where the tensor-core figures are quoted
#: "with sparsity" and are halved here. Matched in order against the lower-cased device name,
#: before Lightning is asked; every other device gets Lightning's number.
#:
#: * H200 (SXM, also GH200) and H200 NVL: Lightning has only ``"h200 sxm1"``/``"h200 nvl1"``, which
#:   real device names ("NVIDIA H200", "NVIDIA H200 NVL") never match, and their values are the
#:   sparse ones. NVIDIA H200 Tensor Core GPU datasheet: SXM BF16/FP16 1,979 TFLOPS*, TF32 989*,
#:   FP32 67; NVL BF16/FP16 1,671*, TF32 835*, FP32 60 (* with sparsity).
#: * H100 NVL: Lightning gives the sparse SXM figures (1,979 TFLOP/s bf16). NVIDIA H100 Tensor
#:   Core GPU datasheet, H100 NVL column: BF16/FP16 1,671 TFLOPS*, TF32 835*, FP32 60.
#: * L40S and L40: Lightning maps every name containing "l4" but not "tesla" to the L4.
#:   NVIDIA L40S datasheet: BF16/FP16 362.05 | 733* TFLOPS, TF32 183 | 366*, FP32 91.6.
#:   NVIDIA L40 datasheet: BF16/FP16 181.05 | 362.1*, TF32 90.5 | 181*, FP32 90.5.
PEAK_FLOPS_CORRECTIONS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("h200 nvl", (835.5e12, 417.5e12, 60e12)),
    ("h200", (989.5e12, 494.5e12, 67e12)),
    ("h100 nvl", (835.5e12, 417.5e12, 60e12)),
    ("l40s", (362.05e12, 183e12, 91.6e12)),
    ("l40", (181.05e12, 90.5e12, 90.5e12)),
)

_COMPONENTS = ("data", "fwd_bwd", "optimizer", "refresh", "other")


def _compute_dtype(precision: str) -> torch.dtype | None:
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("32"):
        return torch.float32
    return None  # 64-bit, transformer-engine, bitsandbytes...: no dense matmul peak to compare with


def peak_flops_for(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` for a Lightning ``precision`` string, or None if unknown.

    The number is Lightning's ``get_available_flops`` except for the devices listed in
    :data:`PEAK_FLOPS_CORRECTIONS`. ``bf16-*``/``16-*`` use the bf16/fp16 peak; ``32-true`` the TF32
    peak unless ``torch.get_float32_matmul_precision() == "highest"`` (then FP32; Lightning also
    takes FP32 before Ampere); CPUs and 64-bit: None. :class:`WallClock`'s ``peak_flops`` overrides it.
    """
    dtype = _compute_dtype(precision)
    if device.type != "cuda" or dtype is None:
        return None
    name = torch.cuda.get_device_name(device).lower()
    for chip, (half, tf32, fp32) in PEAK_FLOPS_CORRECTIONS:
        if chip in name:
            if dtype is not torch.float32:
                return half
            return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


def default_tokens_per_batch(batch: Any) -> int | None:
    """Tokens trained on in ``batch``: ``B·T`` for ``(B, T + 1)`` ids, ``numel`` of inputs else.

    A 2-D tensor is taken as ``(B, T + 1)`` next-token windows (one column per row is only a
    target); an ``(inputs, targets)`` pair or a mapping with ``"input_ids"`` counts the inputs.
    Anything else returns None (pass ``tokens_per_batch`` to :class:`WallClock`).
    """
    if isinstance(batch, Tensor) and batch.ndim == 2:
        return batch.numel() - batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0].numel()
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        return batch["input_ids"].numel()
    return None


def _refresh_attrs(opt: Any) -> list[tuple[Any, Any]]:
    """``(owner, last_refresh_seconds)`` for the optimizer and its children (mixes, wrappers)."""
    out, stack, seen = [], [opt], set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        out.append((obj, getattr(obj, "last_refresh_seconds", None)))
        stack.append(getattr(obj, "optimizer", None))
        children = getattr(obj, "children", None)
        if isinstance(children, (list, tuple)):
            stack.extend(children)
    return out


def _new_step() -> dict[str, float]:
    return {**{k: 0.0 for k in _COMPONENTS}, "tokens": 0.0, "micro_batches": 0.0}


class WallClock(Callback):
    """Per-step time split, tokens/s, optimizer share, MFU, and time/tokens to target losses.

    Args:
        targets: losses to reach (``[3.5, 3.3]``); when the monitored loss first falls to or below
            one, its step, tokens, training seconds and elapsed seconds are logged and kept.
        log_every_n_steps: log the averages over this many optimizer steps; default: the
            trainer's ``log_every_n_steps`` (50 unless set), as Lightning's own callbacks do —
            logging a dozen scalars every step would cost TensorBoard more than the 1% this
            callback may take on a small model. Targets are logged as soon as they are reached.
        flops_per_token: training FLOPs per token (a number or a zero-argument callable); default
            ``pl_module.model.flops_per_token()`` or ``pl_module.flops_per_token()`` if present.
        peak_flops: peak FLOP/s of one device; default :func:`peak_flops_for` the device at the
            trainer's precision (Lightning's ``get_available_flops``, corrected by
            :data:`PEAK_FLOPS_CORRECTIONS`); on CPU or an unknown device, MFU only when this is given.
        sync_cuda: ``torch.cuda.synchronize()`` before each host-clock reading on CUDA, so a
            phase's kernels are charged to it and not to the next phase (costs some CPU/GPU
            overlap; turn off for a cheaper, coarser split).
        monitor: the logged metric watched for ``targets`` (e.g. ``"val/loss"``, read from
            ``trainer.callback_metrics``); default: the training loss of each step from the step
            outputs (mean over its micro-batches).
        tokens_per_batch: ``batch -> int`` tokens per micro-batch on one device; default
            :func:`default_tokens_per_batch`.
        verbose: print the summary table at the end of fit (rank zero).

    Logged keys (``wallclock/...``): ``step_seconds``, ``{data,fwd_bwd,optimizer,refresh,other}
    _seconds`` (per step, averaged over the logging interval), ``optimizer_share``,
    ``tokens_per_sec`` (all devices), ``mfu``, ``train_seconds``, ``elapsed_seconds``,
    ``val_seconds``, ``eval_seconds`` and ``target_<loss>/{step,tokens,
    train_seconds,elapsed_seconds}``. The cumulative token count is logged once, by
    ``CausalLMModule``, as ``train/tokens``; it is in :attr:`summary`, which returns the totals as a dict.
    With more than one rank (DDP, FSDP2) the keys above are rank zero's, and every log step also
    gathers each rank's ``rank<r>/step_seconds`` and ``rank<r>/optimizer_seconds``, with
    ``step_seconds_max``, ``optimizer_seconds_max`` and ``slowest_rank`` (kept in
    :attr:`rank_seconds` on every rank).

    ``train_seconds`` sums the step times (validation and evaluation excluded);
    ``elapsed_seconds`` is the wall time since training started. Both continue across a resume
    from a checkpoint. Evaluation run by other code inside fit can be charged to
    ``eval_seconds`` with ``with WallClock.time_evaluation(trainer): ...``.

    Example:
        >>> trainer = L.Trainer(callbacks=[WallClock(targets=[3.5, 3.3])])
    """

    def __init__(
        self,
        targets: Sequence[float] = (),
        log_every_n_steps: int | None = None,
        flops_per_token: float | Callable[[], float] | None = None,
        peak_flops: float | None = None,
        sync_cuda: bool = True,
        monitor: str | None = None,
        tokens_per_batch: Callable[[Any], int] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.targets = _validated_targets(targets)
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be an integer ≥ 1 or None (the trainer's), got {log_every_n_steps!r}")
        if flops_per_token is not None and not callable(flops_per_token):
            if not isinstance(flops_per_token, (int, float)) or not 0 < flops_per_token < math.inf:
                raise ValueError(f"flops_per_token must be a positive number or a callable, got {flops_per_token!r}")
        if peak_flops is not None and (not isinstance(peak_flops, (int, float)) or not 0 < peak_flops < math.inf):
            raise ValueError(f"peak_flops must be a positive number of FLOP/s (e.g. 989e12), got {peak_flops!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a logged metric name such as 'val/loss' or None, got {monitor!r}")
        if tokens_per_batch is not None and not callable(tokens_per_batch):
            raise ValueError(f"tokens_per_batch must be a callable batch -> int, got {tokens_per_batch!r}")
        self.log_every_n_steps = log_every_n_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.sync_cuda = bool(sync_cuda)
        self.monitor = monitor
        self.tokens_per_batch = tokens_per_batch or default_tokens_per_batch
        self.verbose = verbose
        self._state_key = self._generate_state_key(targets=self.targets, monitor=self.monitor)
        # persistent totals (saved in checkpoints)
        self.totals: dict[str, float] = {**_new_step(), "steps": 0.0, "val": 0.0, "eval": 0.0}
        self.reached: dict[str, dict[str, float]] = {}
        self._elapsed_base = 0.0
        # run-time state
        self._fpt: float | None = None
        self._fpt_resolved = False
        self._peak: float | None = None
        self._world = 1
        self._throughput: Throughput | None = None
        self._throughput_steps = 0
        self._cuda: torch.device | None = None
        self._handles: list[Any] = []
        self._train_t0: float | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        #: every rank's per-step seconds in the last logging window (``[{"step", "optimizer"}]``, rank order); multi-rank runs only
        self.rank_seconds: list[dict[str, float]] = []
        self._step = _new_step()
        self._window = _new_step()
        self._window_steps = 0
        self._losses: list[Tensor] = []
        self._loss_scale = 1
        self._prev_end: float | None = None
        self._excluded = 0.0  # validation/evaluation seconds inside the current between-batch gap
        self._batch_start = 0.0
        self._opt_in_batch = 0.0
        self._last_opt_end: float | None = None
        self._t_before: float | None = None
        self._t_post: float | None = None
        self._refresh_before: list[tuple[Any, Any]] = []
        self._seen_global_step = 0
        self._last_snapshot: dict[str, float] | None = None
        self._warned_tokens = False
        self._val_t0: float | None = None
        self._eval_t0: float | None = None

    @property
    def state_key(self) -> str:
        return self._state_key  # computed once: Lightning reads it at every hook call

    # ------------------------------------------------------------------ clocks
    def _tick(self) -> float:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        return _now()

    def _elapsed(self) -> float:
        return self._elapsed_base + (_now() - self._train_t0 if self._train_t0 is not None else 0.0)

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        device = pl_module.device
        self._cuda = device if self.sync_cuda and device.type == "cuda" else None
        self._world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        self._fpt, self._fpt_resolved = None, False
        self._peak = self.peak_flops if self.peak_flops is not None else peak_flops_for(device, str(trainer.precision))
        self._reset_run_state()
        # tokens/s and MFU over each logging interval: Lightning's Throughput, fed once per
        # optimizer step with the cumulative training seconds and tokens, windowed over the
        # interval's steps (window_size counts the interval's start as well)
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._throughput = Throughput(available_flops=self._peak, world_size=self._world, window_size=interval + 1)
        self._seed_throughput()
        self._seen_global_step = trainer.global_step
        for opt in trainer.optimizers:
            if hasattr(opt, "register_step_post_hook"):
                self._handles.append(opt.register_step_post_hook(self._after_optimizer_step))
        self._train_t0 = self._tick()

    def _seed_throughput(self) -> None:
        """(Re)start the throughput window at the current totals."""
        assert self._throughput is not None
        self._throughput.reset()
        self._throughput_steps = 0
        self._throughput.update(time=self._train_seconds(self.totals), batches=0,
                                samples=self.totals["tokens"] / self._world, flops=0)

    def _update_throughput(self, step: Mapping[str, float]) -> None:
        if self._throughput is None:
            return
        if step["tokens"] <= 0 or self._train_seconds(step) <= 0:
            # Throughput needs time and tokens to grow at every update: a step without either
            # restarts the window (its interval then logs no tokens/s or MFU)
            self._seed_throughput()
            return
        self._throughput_steps += 1
        tokens_per_device = step["tokens"] / self._world
        self._throughput.update(time=self._train_seconds(self.totals), batches=self._throughput_steps,
                                samples=self.totals["tokens"] / self._world,
                                flops=(self._fpt or 0.0) * tokens_per_device)

    def _resolve_flops_per_token(self, pl_module: "pl.LightningModule", batch: Any) -> float | None:
        source: Any = self.flops_per_token
        if source is None:
            for owner in (getattr(pl_module, "model", None), pl_module):
                if callable(getattr(owner, "flops_per_token", None)):
                    source = owner.flops_per_token
                    break
        if not callable(source):
            return float(source) if source is not None else None
        # the attention term depends on the trained sequence length, when the model asks for it
        if isinstance(batch, Tensor) and batch.ndim == 2 and "seq_len" in inspect.signature(source).parameters:
            value = source(seq_len=batch.shape[1] - 1)
        else:
            value = source()
        return float(value) if value is not None and value > 0 else None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_monitor(trainer)
        self._elapsed_base = self._elapsed()
        self._train_t0 = None
        self._remove_hooks()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.verbose and trainer.is_global_zero and self.totals["steps"] > 0:
            print(format_summary(self.summary))

    # ------------------------------------------------------------------ the step
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._prev_end, self._excluded = self._tick(), 0.0

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        # a named metric logged by the previous step reaches callback_metrics only after its
        # on_train_batch_end, so it is checked here (against that step's counters)
        self._check_monitor(trainer)
        t = self._tick()
        if self._prev_end is not None:
            self._step["data"] += max(0.0, t - self._prev_end - self._excluded)
        self._excluded = 0.0
        if not self._fpt_resolved:
            self._fpt, self._fpt_resolved = self._resolve_flops_per_token(pl_module, batch), True
        self._batch_start, self._opt_in_batch, self._last_opt_end = t, 0.0, None
        tokens = self.tokens_per_batch(batch)
        if tokens is None and not self._warned_tokens:
            self._warned_tokens = True
            rank_zero_warn(f"WallClock cannot count tokens in a batch of type {type(batch).__name__}; pass "
                           "tokens_per_batch=fn (batch -> int) to get tokens/s and MFU")
        self._step["tokens"] += float(tokens or 0)
        self._step["micro_batches"] += 1

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        # In automatic optimization the closure (training_step + backward) runs *inside*
        # optimizer.step and this hook fires right after it, so this is where the update begins.
        # A torch step post-hook marks where it ends: exact, unlike on_train_batch_end, which
        # comes after loop bookkeeping. (The pre-hook would fire before the closure.)
        if self._t_before is not None:
            self._close_optimizer_interval(self._t_post if self._t_post is not None else self._tick())
        self._t_before, self._t_post = self._tick(), None
        self._refresh_before = _refresh_attrs(optimizer)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # may fire more than once per step (a subclass calling a hooked super().step()): last wins
        if self._t_before is not None:
            self._t_post = self._tick()

    def _close_optimizer_interval(self, end: float) -> None:
        assert self._t_before is not None
        seconds = max(0.0, end - self._t_before)
        self._step["optimizer"] += seconds
        self._opt_in_batch += seconds
        for owner, before in self._refresh_before:
            after = getattr(owner, "last_refresh_seconds", None)
            # a refresh counts when the attribute was (re)assigned during this step
            if after is not before and isinstance(after, (int, float)) and after > 0:
                self._step["refresh"] += float(after)
        self._t_before, self._t_post, self._last_opt_end = None, None, end

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        t = self._tick()
        if self._t_before is not None:  # no post-hook (not a torch optimizer, or a skipped step)
            self._close_optimizer_interval(self._t_post if self._t_post is not None else t)
        tail = t - self._last_opt_end if self._last_opt_end is not None else 0.0
        self._step["other"] += tail
        self._step["fwd_bwd"] += max(0.0, t - self._batch_start - self._opt_in_batch - tail)
        self._prev_end = t
        if self.targets and self.monitor is None:
            self._add_loss(trainer, pl_module, outputs)
        if trainer.global_step != self._seen_global_step:
            self._seen_global_step = trainer.global_step
            self._finish_step(trainer)

    def _add_loss(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach())
            # automatic optimization divides the loss by accumulate_grad_batches; undo it
            self._loss_scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1

    def _finish_step(self, trainer: "pl.Trainer") -> None:
        step = self._step
        step["tokens"] *= self._world
        for key, value in step.items():
            self.totals[key] += value
            self._window[key] += value
        self.totals["steps"] += 1
        self._window_steps += 1
        self._update_throughput(step)
        self._last_snapshot = {
            "step": float(trainer.global_step), "tokens": self.totals["tokens"],
            "train_seconds": self._train_seconds(self.totals),
        }
        if self.targets and self.monitor is None and self._losses:
            mean = sum(float(x) for x in self._losses) * self._loss_scale / len(self._losses)
            self._check_targets(trainer, mean)
        self._losses = []
        if self._window_steps >= (self.log_every_n_steps or trainer.log_every_n_steps or 1):
            metrics = self._window_metrics()
            if trainer.world_size > 1:  # every rank logs here at the same steps: a collective is safe
                metrics.update(self._rank_metrics(trainer, metrics))
            self._log(trainer, metrics)
            self._window, self._window_steps = _new_step(), 0
        self._step = _new_step()

    @staticmethod
    def _train_seconds(d: Mapping[str, float]) -> float:
        return d["data"] + d["fwd_bwd"] + d["optimizer"] + d["other"]

    def _window_metrics(self) -> dict[str, float]:
        w, n = self._window, self._window_steps
        seconds = self._train_seconds(w)
        m = {f"wallclock/{k}_seconds": w[k] / n for k in _COMPONENTS}
        m["wallclock/step_seconds"] = seconds / n
        m["wallclock/optimizer_share"] = w["optimizer"] / seconds if seconds > 0 else 0.0
        rates = self._throughput.compute() if self._throughput is not None else {}
        if "device/samples_per_sec" in rates:  # the window holds every step of this interval
            m["wallclock/tokens_per_sec"] = rates["device/samples_per_sec"] * self._world
            if self._fpt is not None and "device/mfu" in rates:
                m["wallclock/mfu"] = rates["device/mfu"]
        m["wallclock/train_seconds"] = self._train_seconds(self.totals)
        m["wallclock/elapsed_seconds"] = self._elapsed()
        return m

    def _rank_metrics(self, trainer: "pl.Trainer", metrics: Mapping[str, float]) -> dict[str, float]:
        """Every rank's step and optimizer seconds (one all-gather of two numbers per log step), the
        slowest rank's, and which rank that is: ranks wait for the slowest at every collective, and an
        owner rank of matrix preconditioners doing more than its share shows here."""
        local = torch.tensor([metrics["wallclock/step_seconds"], metrics["wallclock/optimizer_seconds"]],
                             dtype=torch.float64, device=trainer.strategy.root_device)
        table = trainer.strategy.all_gather(local).reshape(-1, 2).cpu().tolist()  # (world, 2)
        self.rank_seconds = [{"step": step, "optimizer": opt} for step, opt in table]
        out = {f"wallclock/rank{r}/step_seconds": step for r, (step, _) in enumerate(table)}
        out.update({f"wallclock/rank{r}/optimizer_seconds": opt for r, (_, opt) in enumerate(table)})
        slowest = max(range(len(table)), key=lambda r: table[r][0])
        out["wallclock/step_seconds_max"] = table[slowest][0]
        out["wallclock/optimizer_seconds_max"] = max(opt for _, opt in table)
        out["wallclock/slowest_rank"] = float(slowest)
        return out

    def _mfu(self, tokens_all_devices: float, seconds: float) -> float | None:
        if self._fpt is None or self._peak is None or seconds <= 0:
            return None
        return self._fpt * tokens_all_devices / self._world / seconds / self._peak

    # ------------------------------------------------------------------ targets
    def _check_monitor(self, trainer: "pl.Trainer") -> None:
        if not self.targets or self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self._check_targets(trainer, float(value))

    def _check_targets(self, trainer: "pl.Trainer", loss: float) -> None:
        snap = self._last_snapshot
        if snap is None or not math.isfinite(loss):
            return
        new = {}
        for target in self.targets:
            key = f"{target:g}"
            if key not in self.reached and loss <= target:
                self.reached[key] = rec = {**snap, "target": target, "loss": loss, "elapsed_seconds": self._elapsed()}
                new.update({f"wallclock/target_{key}/{k}": rec[k] for k in ("step", "tokens", "train_seconds", "elapsed_seconds")})
        if new:
            self._log(trainer, new)

    # ------------------------------------------------------------------ validation / evaluation
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._val_t0 = None if trainer.sanity_checking else self._tick()

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._val_t0 is None:
            return
        seconds = self._tick() - self._val_t0
        self._val_t0 = None
        self.totals["val"] += seconds
        self._excluded += seconds
        self._check_monitor(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._log(trainer, {"wallclock/val_seconds": self.totals["val"]})

    def _eval_start(self) -> None:
        self._eval_t0 = self._tick()

    def _eval_end(self) -> None:
        if self._eval_t0 is not None:
            seconds = self._tick() - self._eval_t0
            self.totals["eval"] += seconds
            self._excluded += seconds
            self._eval_t0 = None

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_start()

    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval_end()

    on_predict_start, on_predict_end = on_test_start, on_test_end

    @staticmethod
    @contextlib.contextmanager
    def time_evaluation(trainer: "pl.Trainer") -> Iterator[None]:
        """Charge the enclosed block to ``eval_seconds`` of the trainer's WallClock(s), if any
        (and keep it out of the training steps' ``data`` time)."""
        clocks = [cb for cb in trainer.callbacks if isinstance(cb, WallClock)]
        for clock in clocks:
            clock._eval_start()
        try:
            yield
        finally:
            for clock in clocks:
                clock._eval_end()

    # ------------------------------------------------------------------ output
    def _log(self, trainer: "pl.Trainer", metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        # Lightning logs training metrics of the step just taken at (steps completed - 1)
        step = max(0, trainer.global_step - 1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @property
    def summary(self) -> dict[str, Any]:
        """Totals so far: steps, tokens, seconds per component, shares, tokens/s, MFU, targets."""
        t = self.totals
        seconds = self._train_seconds(t)
        out: dict[str, Any] = {
            "steps": int(t["steps"]), "tokens": int(t["tokens"]), "train_seconds": seconds,
            **{f"{k}_seconds": t[k] for k in _COMPONENTS},
            "val_seconds": t["val"], "eval_seconds": t["eval"], "elapsed_seconds": self._elapsed(),
            "optimizer_share": t["optimizer"] / seconds if seconds > 0 else 0.0,
            "tokens_per_sec": t["tokens"] / seconds if seconds > 0 else 0.0,
            "mfu": self._mfu(t["tokens"], seconds),
            "targets": {f"{x:g}": dict(self.reached[f"{x:g}"]) if f"{x:g}" in self.reached else None for x in self.targets},
        }
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "reached": {k: dict(v) for k, v in self.reached.items()},
                "elapsed_seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update({k: float(v) for k, v in state_dict.get("totals", {}).items()})
        self.reached = {k: dict(v) for k, v in state_dict.get("reached", {}).items()}
        self._elapsed_base = float(state_dict.get("elapsed_seconds", 0.0))
        if self._train_t0 is not None:  # loaded while training: the clock restarts from here
            self._train_t0 = _now()


def _validated_targets(targets: Sequence[float]) -> tuple[float, ...]:
    if isinstance(targets, (int, float)):
        targets = (targets,)
    out: list[float] = []
    for x in targets:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"targets must be finite loss values such as [3.5, 3.3], got {x!r} in {list(targets)!r}")
        if float(x) not in out:
            out.append(float(x))
    return tuple(out)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The end-of-fit table of :attr:`WallClock.summary`."""
    s = summary
    train = s["train_seconds"] or float("nan")

    def row(label: str, seconds: float, share: bool = True) -> str:
        pct = f"{100 * seconds / train:6.1f} %" if share and train > 0 else ""
        return f"  {label:<22}{seconds:>11.3f} s  {pct}"

    mfu = f"{100 * s['mfu']:.1f} %" if s.get("mfu") is not None else "n/a (FLOPs per token or peak FLOP/s unknown)"
    lines = [
        "WallClock summary",
        f"  {'optimizer steps':<22}{s['steps']:>11,}",
        f"  {'tokens':<22}{s['tokens']:>11,}",
        row("training (steps)", s["train_seconds"], share=False),
        row("  data wait", s["data_seconds"]),
        row("  forward+backward", s["fwd_bwd_seconds"]),
        row("  optimizer step", s["optimizer_seconds"]),
        row("    of which refresh", s["refresh_seconds"]),
        row("  other", s["other_seconds"]),
        row("validation", s["val_seconds"], share=False),
        row("evaluation", s["eval_seconds"], share=False),
        row("elapsed (wall)", s["elapsed_seconds"], share=False),
        f"  {'tokens/s':<22}{s['tokens_per_sec']:>11,.0f}",
        f"  {'optimizer share':<22}{100 * s['optimizer_share']:>10.1f} %",
        f"  {'MFU':<22}{mfu:>11}",
    ]
    for key, rec in s.get("targets", {}).items():
        if rec is None:
            lines.append(f"  target loss {key:<10} not reached")
        else:
            lines.append(f"  target loss {key:<10} step {int(rec['step']):,}, {int(rec['tokens']):,} tokens, "
                         f"{rec['train_seconds']:.2f} s training, {rec['elapsed_seconds']:.2f} s elapsed")
    return "\n".join(lines)
