"""Sophia (Liu et al. 2023): sign momentum scaled by a diagonal curvature estimate and clipped.

The optimizer keeps a momentum ``m`` and an EMA ``h`` of a diagonal Hessian estimate ``ĥ``;
``h`` is refreshed every ``update_period`` steps by one of the two estimators below, called from
the training step:

* :func:`sophia_gnb_estimate` (Sophia-G, Gauss-Newton-Bartlett) from the step's own logits;
* :func:`sophia_hutchinson_estimate` (Sophia-H, Hutchinson) from the step's loss.

Both are no-ops except when an estimate is due, accept Lightning's ``LightningOptimizer``
wrapper and optimizers holding Sophia children (an ``OptimizerMix``), and do nothing for any
other optimizer, so a training step can call them unconditionally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from ._validate import check_betas, check_eps, check_lr, check_positive_int, check_range, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_choice, iter_leaf_optimizers
from .health import HealthMixin, quantile_stats, update_stats

__all__ = ["Sophia", "SophiaHParams", "sophia_update", "sophia_gnb_estimate", "sophia_hutchinson_estimate"]

ESTIMATORS = ("gnb", "hutchinson")


def _clipped_ratio(exp_avgs: list[Tensor], hessians: list[Tensor], *, rho: float, eps: float, clamp_hessian: bool) -> list[Tensor]:
    """sign(m)·min(|m| / (ρ·h + ε), 1), computed as clamp(m / (ρ·h + ε), −1, 1) (equal since ρ·h + ε > 0)."""
    denom = torch._foreach_mul(hessians, rho)
    if clamp_hessian:
        # Hutchinson's ĥ = u⊙(∇²L·u) can be negative, and a negative denominator would flip the
        # step's sign. The paper's Algorithm 3 divides by max(ρ·h, ε); ρ·max(h, 0) + ε is the same
        # guard written as the official code's ρ·h + ε (identical wherever h ≥ 0, as with GNB).
        torch._foreach_clamp_min_(denom, 0.0)
    torch._foreach_add_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    del denom
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    return ratio


def sophia_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    eps: float,
    weight_decay: float,
    clamp_hessian: bool = False,
) -> None:
    """m ← β1·m + (1−β1)·g;  W ← W − ηλW;  W ← W − η·sign(m)·min(|m| / (ρ·h + ε), 1)  (in place, foreach).

    The weight decay uses the pre-update W (the clipped ratio does not depend on W).
    ``clamp_hessian`` reads h as max(h, 0) in the denominator (for Hutchinson estimates).
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    ratio = _clipped_ratio(exp_avgs, hessians, rho=rho, eps=eps, clamp_hessian=clamp_hessian)
    torch._foreach_add_(params, ratio, alpha=-lr)


@dataclass(kw_only=True)
class SophiaHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 1e-4
    #: (β1, β2): the momentum's and the Hessian EMA's decay, each in [0, 1)
    betas: tuple[float, float] = (0.965, 0.99)
    #: clipping scale ρ (> 0)
    rho: float = 0.04
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.1
    #: steps between Hessian estimates (integer ≥ 1)
    update_period: int = 10
    #: ε in the denominator (> 0)
    eps: float = 1e-15
    #: "gnb" (Sophia-G) or "hutchinson" (Sophia-H)
    estimator: str = "gnb"

    def check(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_range("rho", self.rho, 0.0, float("inf"), lo_open=True)
        check_weight_decay(self.weight_decay)
        check_positive_int("update_period", self.update_period)
        check_eps(self.eps)
        check_choice("estimator", self.estimator, ESTIMATORS)


class Sophia(OptlabOptimizer, HealthMixin, torch.optim.Optimizer):
    """Sophia: W ← W − ηλW − η·sign(m)·min(|m| / (ρ·h + ε), 1), h an EMA of a diagonal Hessian estimate.

    m ← β1·m + (1−β1)·g every step; every ``update_period`` steps the training step refreshes
    h ← β2·h + (1−β2)·ĥ through :func:`sophia_gnb_estimate` (Sophia-G, ĥ = B·ĝ⊙ĝ with ĝ the
    gradient of the loss on labels sampled from the model) or :func:`sophia_hutchinson_estimate`
    (Sophia-H, ĥ = u⊙(∇²L·u)), or directly through :meth:`update_hessian`. h holds ĥ with the
    batch size B already in it, so the denominator is ρ·h + ε (the official code's ρ·B·h + ε).

    Args:
        params: parameters, (name, parameter) pairs or param-group dicts.
        lr: η (default 1e-4, the official implementation's default; the paper's GPT-2 runs use
            a few times larger values, with ρ ≈ 0.03-0.05).
        betas: (β1, β2), the momentum's and the Hessian EMA's decay (default (0.965, 0.99)).
        rho: ρ, the clipping scale (default 0.04).
        weight_decay: decoupled λ (default 0.1).
        update_period: k, steps between Hessian estimates (default 10).
        eps: ε in the denominator (default 1e-15).
        estimator: ``"gnb"`` (Sophia-G) or ``"hutchinson"`` (Sophia-H); which estimate function
            the training step must call. With ``"hutchinson"`` a negative h counts as 0.

    Timing is the official loop's: there it refreshes h after the optimizer steps k, 2k, ..., on
    the latest batch; here the estimate functions run in the next training step, before its
    optimizer step, when the optimizer's own step count is a positive multiple of k, once per
    step count (with gradient accumulation only the first micro-batch estimates).

    Example (a LightningModule; two lines in the training step)::

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x); loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            sophia_gnb_estimate(self.optimizers(), logits)   # a no-op except every k-th step
            return loss

    Plain PyTorch: call the estimate between the forward pass and ``loss.backward()``.

    Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training" (2023), arXiv:2305.14342.
    """

    hparams_class = SophiaHParams
    traits = Traits(mup_family="sophia")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        update_period: int = 10,
        eps: float = 1e-15,
        estimator: str = "gnb",
        nonfinite: str = "ignore",
    ) -> None:
        SophiaHParams(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, update_period=update_period, eps=eps,
                      estimator=estimator, nonfinite=nonfinite)
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, update_period=update_period, eps=eps,
            estimator=estimator, nonfinite=nonfinite,
        )
        #: Hessian estimates skipped because the logits (or the estimate) were not finite
        self.skipped_estimates = 0
        super().__init__(params, defaults)

    def _state_of(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # Step counters are Python ints: exact in any checkpoint, and no host sync to read them.
            state["step"] = 0
            state["hessian_step"] = 0  # the step count at the last update_hessian
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self) -> None:
        for group in self.param_groups:
            params, grads, exp_avgs, hessians = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
            if params:
                sophia_update(
                    params,
                    grads,
                    exp_avgs,
                    hessians,
                    lr=group["lr"],
                    beta1=group["betas"][0],
                    rho=group["rho"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    clamp_hessian=group["estimator"] == "hutchinson",
                )

    @classmethod
    def training_step_hook(cls, optimizers: list["OptlabOptimizer"], *, logits: Optional[Tensor] = None,
                           loss: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> bool:
        """The curvature estimate each Sophia's ``estimator`` asks for: Sophia-G from ``logits``,
        Sophia-H from ``loss`` (a no-op except when an estimate is due)."""
        gnb = [o for o in optimizers if all(g["estimator"] == "gnb" for g in o.param_groups)]
        hutch = [o for o in optimizers if o not in gnb]
        acted = False
        if gnb and logits is not None:
            acted = sophia_gnb_estimate(gnb, logits, generator=generator) or acted
        if hutch and loss is not None:
            acted = sophia_hutchinson_estimate(hutch, loss, generator=generator) or acted
        return acted

    def effective_lr(self, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[Tensor]:
        """η / max(ρ·h + ε, |m|) per coordinate (see :meth:`_param_health`)."""
        if "hessian" not in state:
            return None
        h = state["hessian"].float()
        h = h.clamp_min(0.0) if group["estimator"] == "hutchinson" else h
        return float(group["lr"]) / torch.maximum(group["rho"] * h + group["eps"], state["exp_avg"].float().abs())

    def hessian_due(self) -> list[Tensor]:
        """Parameters (requiring grad) whose Hessian estimate is due now.

        Due: the parameter's step count t is a positive multiple of its group's ``update_period``
        and :meth:`update_hessian` has not run for it at this t yet.
        """
        due = []
        for group in self.param_groups:
            k = group["update_period"]
            for p in group["params"]:
                state = self.state.get(p)
                if not p.requires_grad or not state:
                    continue
                t = state["step"]
                if t > 0 and t % k == 0 and state["hessian_step"] != t:
                    due.append(p)
        return due

    @torch.no_grad()
    def update_hessian(self, hessian_estimates: Union[Mapping[Tensor, Optional[Tensor]], Sequence[Optional[Tensor]]]) -> None:
        """h ← β2·h + (1−β2)·ĥ for the parameters given.

        Args:
            hessian_estimates: ``{param: ĥ}``, or a sequence of ĥ aligned with every parameter of
                every group in order. ĥ has the parameter's shape and already includes the batch
                size B (Sophia-G's B·ĝ⊙ĝ). ``None`` leaves h unchanged but records the visit.

        This call is not gated by ``update_period``; the estimate functions are.
        """
        all_params = [p for g in self.param_groups for p in g["params"]]
        if isinstance(hessian_estimates, Mapping):
            lookup = {id(p): h for p, h in hessian_estimates.items()}
            unknown = set(lookup) - {id(p) for p in all_params}
            if unknown:
                raise ValueError(f"{len(unknown)} tensor(s) in hessian_estimates are not parameters of this optimizer")
        else:
            seq = list(hessian_estimates)
            if len(seq) != len(all_params):
                raise ValueError(
                    f"hessian_estimates has {len(seq)} entries, this optimizer has {len(all_params)} parameters; "
                    "pass one per parameter in param-group order, or a {param: estimate} dict"
                )
            lookup = {id(p): h for p, h in zip(all_params, seq)}
        for group in self.param_groups:
            hessians, estimates = [], []
            for p in group["params"]:
                if id(p) not in lookup:
                    continue
                est = lookup[id(p)]
                state = self._state_of(p)
                state["hessian_step"] = state["step"]
                if est is None:
                    continue
                if not isinstance(est, Tensor) or est.shape != p.shape:
                    got = tuple(est.shape) if isinstance(est, Tensor) else type(est).__name__
                    raise ValueError(f"Hessian estimate must have the parameter's shape {tuple(p.shape)}, got {got}")
                hessians.append(state["hessian"])
                estimates.append(est.detach().to(dtype=p.dtype, device=p.device))
            if hessians:
                beta2 = group["betas"][1]
                torch._foreach_mul_(hessians, beta2)
                torch._foreach_add_(hessians, estimates, alpha=1.0 - beta2)

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        """clip_frac, eff_lr_* (η / max(ρ·h + ε, |m|)), eps_frac, update_rms, update_to_weight, hessian_age.

        The effective learning rate is what multiplies m in the step: η / (ρ·h + ε) where the clip
        is inactive and η / |m| where it binds (the step is then η·sign(m)), i.e.
        η / max(ρ·h + ε, |m|), capped by the clip. ``eps_frac``: fraction where ρ·h < ε.
        ``update_rms`` is the step the current m and h give (weight decay excluded).
        """
        dtype = torch.promote_types(p.dtype, torch.float32)
        m = state["exp_avg"].to(dtype)
        h = state["hessian"].to(dtype)
        if group["estimator"] == "hutchinson":
            h = h.clamp_min(0.0)
        rho, eps, lr = group["rho"], group["eps"], float(group["lr"])
        curvature = rho * h
        denom = curvature + eps
        ratio = m / denom
        out = quantile_stats("eff_lr", lr / torch.maximum(denom, m.abs()))
        out["clip_frac"] = (ratio.abs() >= 1).float().mean().item()
        out["eps_frac"] = (curvature < eps).float().mean().item()
        out.update(update_stats(p, lr * ratio.clamp(-1.0, 1.0)))
        out["hessian_age"] = float(state["step"] - state["hessian_step"])
        return out


# --- the estimators ---------------------------------------------------------------------------


def _find_sophias(optimizer: Any) -> list[Sophia]:
    """Sophia instances in ``optimizer``: itself, behind a ``.optimizer`` wrapper, or among ``children``."""
    return [o for o in iter_leaf_optimizers(optimizer) if isinstance(o, Sophia)]


def _due_targets(optimizer: Any, estimator: str, fn_name: str) -> list[tuple[Sophia, Tensor]]:
    other = {"gnb": "sophia_hutchinson_estimate(optimizer, loss)", "hutchinson": "sophia_gnb_estimate(optimizer, logits)"}
    targets = []
    for opt in _find_sophias(optimizer):
        for group in opt.param_groups:
            if group["estimator"] != estimator:
                raise ValueError(
                    f"{fn_name} called for a Sophia built with estimator={group['estimator']!r}; "
                    f"call {other[estimator]} instead, or build Sophia with estimator={estimator!r}"
                )
        targets.extend((opt, p) for p in opt.hessian_due())
    return targets


def _world_size(sync: bool) -> int:
    if sync and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _average_over_ranks(tensors: list[Tensor], world: int) -> None:
    """Average in place across the default process group (data parallelism keeps h identical)."""
    if world <= 1 or not tensors:
        return
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in tensors]
    for w in works:
        w.wait()
    torch._foreach_div_(tensors, float(world))


def _skip_estimate(targets: list[tuple[Sophia, Tensor]]) -> None:
    """A due estimate that cannot be made: h unchanged, the visit recorded (no retry this step), counted, reported."""
    seen: set[int] = set()
    for opt, p in targets:
        opt.state[p]["hessian_step"] = opt.state[p]["step"]
        if id(opt) not in seen:
            seen.add(id(opt))
            opt.skipped_estimates += 1
            opt.report_nonfinite("Sophia's Hessian estimate (non-finite logits)")


def _apply(targets: list[tuple[Sophia, Tensor]], estimates: Sequence[Optional[Tensor]]) -> None:
    per_opt: dict[int, tuple[Sophia, dict[Tensor, Optional[Tensor]]]] = {}
    for (opt, p), est in zip(targets, estimates):
        per_opt.setdefault(id(opt), (opt, {}))[1][p] = est
    for opt, mapping in per_opt.values():
        opt.update_hessian(mapping)


def sophia_gnb_estimate(
    optimizer: Any,
    logits: Tensor,
    *,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    num_tokens: Optional[int] = None,
    sync: bool = True,
    clip_norm: Optional[float] = None,
) -> bool:
    """Sophia-G's Gauss-Newton-Bartlett estimate ĥ = B·ĝ⊙ĝ from an existing forward pass.

    ŷ ~ softmax(logits) (sampled with ``torch.multinomial`` on the float32 probabilities of the
    logits flattened to (B, V), using ``generator``), ĝ = ∇ of the mean cross-entropy on ŷ,
    obtained with ``torch.autograd.grad(..., retain_graph=True)``: no ``.grad`` is touched and
    the caller's own ``loss.backward()`` still works. Then h ← β2·h + (1−β2)·ĥ.

    A no-op (returns False) unless an estimate is due (see :meth:`Sophia.hessian_due`) for some
    Sophia in ``optimizer`` (a Sophia, Lightning's wrapper of one, a list of optimizers, or a mix
    with ``children``); any other optimizer is ignored. Parameters not requiring grad are
    skipped; those the logits do not depend on keep their h.

    Args:
        optimizer: as above, e.g. ``self.optimizers()`` in a LightningModule.
        logits: (..., V), attached to the autograd graph.
        loss_fn: ``loss_fn(logits, y_hat) -> mean loss`` instead of the mean cross-entropy over
            every position (e.g. to mask padding; then pass ``num_tokens`` too).
        generator: a ``torch.Generator`` on the logits' device for the sampling.
        num_tokens: B (default: every position of ``logits``).
        sync: under ``torch.distributed``, average ĝ over ranks and count B over all of them, as
            the official DDP loop does (the ranks' h stay identical). Params are assumed
            replicated (DDP), not sharded.
        clip_norm: clip ĝ (over all the estimated parameters together, after the average over
            ranks) to this total 2-norm before squaring, as the authors' training loop does with
            ``clip_grad_norm_(model.parameters(), 1.0)`` before ``update_hessian``. Default None:
            no clipping (this pack's behaviour so far; pass 1.0 for the reference's).

    Non-finite logits (a NaN/Inf, where ``torch.multinomial`` would fail) skip the estimate: h is
    left as it was, the skip is counted in ``Sophia.skipped_estimates`` and reported to
    ``pop_nonfinite_skips`` (so the Lightning ``NonFiniteGuard`` acts on it), and False is returned.

    Returns:
        True when h was updated.
    """
    if clip_norm is not None:
        check_range("clip_norm", clip_norm, 0.0, math.inf, lo_open=True)
    if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[-1] < 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (..., V) with V ≥ 2 classes, got {got}")
    targets = _due_targets(optimizer, "gnb", "sophia_gnb_estimate")
    if not targets:
        return False
    if not logits.requires_grad:
        raise ValueError("logits must be attached to the autograd graph (call from the training forward pass, not under no_grad)")
    flat = logits.reshape(-1, logits.shape[-1])
    world = _world_size(sync)
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        bad = (~torch.isfinite(probs)).any().float()
        if world > 1:  # every rank skips together (the all-reduce below needs them all)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bool(bad):
            _skip_estimate(targets)
            return False
        y_hat = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        del probs
    with torch.enable_grad():
        if loss_fn is None:
            loss = F.cross_entropy(flat, y_hat)
        else:
            loss = loss_fn(logits, y_hat.view(logits.shape[:-1]))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar (mean) loss")
    params = [p for _, p in targets]
    grads = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    batch = int(num_tokens) if num_tokens is not None else y_hat.numel()
    if batch < 1:
        raise ValueError(f"num_tokens must be ≥ 1, got {batch}")
    present = [g for g in grads if g is not None]
    _average_over_ranks(present, world)
    if present and clip_norm is not None:
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(present)]))
        torch._foreach_mul_(present, (clip_norm / (total + 1e-6)).clamp(max=1.0).to(present[0].dtype))
    if present:
        squares = torch._foreach_mul(present, present)
        torch._foreach_mul_(squares, float(batch * world))
        it = iter(squares)
        grads = [None if g is None else next(it) for g in grads]
    _apply(targets, grads)
    return True


def sophia_hutchinson_estimate(
    optimizer: Any,
    loss: Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    sync: bool = True,
) -> bool:
    """Sophia-H's Hutchinson estimate ĥ = u⊙(∇²L·u), u ~ Rademacher, from the step's loss.

    g = ∇L with ``create_graph=True``; Hv = ∇(g·u) with ``retain_graph=True`` (so the caller's
    ``loss.backward()`` still works); u is drawn per parameter, in parameter order, as
    ``2·randint(0, 2) − 1`` with ``generator``. Parameters L depends on only linearly get ĥ = 0.
    Same no-op, timing and unwrapping rules as :func:`sophia_gnb_estimate`; under
    ``torch.distributed`` (``sync``) ĥ is averaged over ranks.

    Returns:
        True when h was updated.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss must be a scalar tensor, got {got}")
    targets = _due_targets(optimizer, "hutchinson", "sophia_hutchinson_estimate")
    if not targets:
        return False
    if not loss.requires_grad:
        raise ValueError("loss must be attached to the autograd graph (call before loss.backward(), not under no_grad)")
    params = [p for _, p in targets]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None]
    us = {
        i: torch.randint(0, 2, params[i].shape, generator=generator, device=params[i].device).to(params[i].dtype).mul_(2).sub_(1)
        for i in live
    }
    curved = [i for i in live if grads[i].requires_grad]
    hvs: dict[int, Optional[Tensor]] = {}
    if curved:
        with torch.enable_grad():
            out = torch.autograd.grad(
                [grads[i] for i in curved], [params[i] for i in curved], grad_outputs=[us[i] for i in curved],
                retain_graph=True, allow_unused=True,
            )
        hvs = dict(zip(curved, out))
    estimates: list[Optional[Tensor]] = [None] * len(params)
    for i in live:
        hv = hvs.get(i)
        estimates[i] = torch.zeros_like(params[i]) if hv is None else us[i] * hv.detach()
    _average_over_ranks([e for e in estimates if e is not None], _world_size(sync))
    _apply(targets, estimates)
    return True
