"""Muon (Jordan et al. 2024): momentum orthogonalized by a quintic Newton-Schulz iteration.

This is ``torch.optim.Muon`` (a subclass: the same param-group keys and state layout, so
checkpoints move between the two; the constructor differs: ``scale`` instead of
``adjust_lr_fn``, plus ``ns_dtype`` and ``nonfinite``) with four changes around the same update:

* the Newton-Schulz iteration runs in ``ns_dtype``: by default bfloat16 on CUDA as torch and
  the paper's code do, and on a CPU bfloat16 where it has bfloat16 dot-product units (the
  ``avx512_bf16`` or ``amx_bf16`` flags), float32 on other CPUs: without those units bfloat16
  matmuls run far slower than float32 ones, with them far faster (a 1024×256 by 256×1024
  product 5.6x faster on an AMD EPYC with AVX512-BF16);
* matrices of the same shape are orthogonalized together in one batched iteration (fewer
  kernel launches on a GPU);
* a parameter that is not a 2-D matrix is refused with a message that says how to route it
  to AdamW, and a non-finite gradient is skipped (state untouched, counted) or raised;
* ``health()`` reports the orthogonality of the Newton-Schulz output and the step sizes.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ._validate import check_beta, check_eps, check_lr, check_positive_int, check_weight_decay
from .base import HParams, OptlabOptimizer, Traits, check_bool, check_choice, looks_flattened
from .health import HealthMixin, quantile_stats, update_stats

__all__ = ["Muon", "MuonHParams", "newton_schulz5", "muon_scale", "cpu_has_bf16_units", "NS_COEFFICIENTS", "SCALES"]

#: the quintic iteration's coefficients (a, b, c), Jordan et al. 2024
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: our ``scale`` names -> torch.optim.Muon's ``adjust_lr_fn`` values
SCALES: dict[str, str] = {"rms_match": "match_rms_adamw", "original": "original"}

_NS_DTYPES: dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_ROUTE_HINT = (
    "route embeddings, the readout, norms and biases to AdamW through the per-role mix, e.g. "
    "lightning_optlab.configure(model, 'muon', lr=0.02, mix=[{'optimizer': 'adamw', "
    "'roles': ['embedding', 'readout', 'norm', 'bias'], 'lr': 3e-3}])"
)


def newton_schulz5(
    u: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7
) -> Tensor:
    """O ≈ U Vᵀ for u = U S Vᵀ: the quintic Newton-Schulz iteration, on a matrix or a batch of them.

    X ← u / max(‖u‖_F, eps), transposed so that rows ≤ cols; then ``steps`` times
    X ← a·X + (b·A + c·A²)·X with A = X Xᵀ and (a, b, c) = (3.4445, −4.7750, 2.0315); transposed
    back. Runs in ``u``'s dtype. The coefficients trade convergence for speed: the singular
    values of the output land in about [0.7, 1.2] rather than at 1 (Jordan et al. 2024).
    The normalization is torch.optim.Muon's (divide by the norm clamped at eps), which differs
    from the paper's ‖u‖ + eps only for gradients of norm ≈ eps.

    Args:
        u: a (rows, cols) matrix or a (batch, rows, cols) stack.
        steps: iterations (default 5).  coefficients: (a, b, c).  eps: norm floor (default 1e-7).

    Example:
        >>> o = newton_schulz5(torch.randn(64, 32, dtype=torch.float64))
        >>> torch.linalg.svdvals(o)  # all in about [0.7, 1.2]
    """
    a, b, c = coefficients
    tall = u.size(-2) > u.size(-1)
    x = u.mT if tall else u
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_min(eps)
    if x.ndim == 2:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def out_in_shape(p: Tensor) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a matrix: ``p.shape`` as ``nn.Linear`` stores it, swapped for a weight stored
    ``(in_features, out_features)`` (HF's ``Conv1D``, tagged ``optlab_in_out`` by
    :func:`lightning_optlab.params.classify_parameters`)."""
    rows, cols = p.size(0), p.size(1)
    return (cols, rows) if getattr(p, "optlab_in_out", False) else (rows, cols)


def muon_scale(scale: Optional[str], rows: int, cols: int) -> float:
    """The shape factor s in W ← W − η·s·O.

    ``"match_rms_adamw"`` (our ``"rms_match"``): s = 0.2·sqrt(max(rows, cols)), which makes the
    update's RMS about 0.2·η like AdamW's, so AdamW's η and λ carry over (Liu et al. 2025);
    ``"original"`` or None: s = sqrt(max(1, rows/cols)) (Jordan et al. 2024).
    """
    if scale == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


@dataclass(kw_only=True)
class MuonHParams(HParams):
    #: learning rate η (≥ 0)
    lr: float = 0.02
    #: momentum μ in [0, 1)
    momentum: float = 0.95
    #: Nesterov momentum
    nesterov: bool = True
    #: Newton-Schulz iterations, an integer in [1, 100)
    ns_steps: int = 5
    #: decoupled weight decay λ (≥ 0)
    weight_decay: float = 0.0
    #: torch's shape scale: "match_rms_adamw" (our scale "rms_match"), "original" or None
    adjust_lr_fn: Optional[str] = "match_rms_adamw"
    #: floor of ‖u‖_F in the normalization (> 0)
    eps: float = 1e-7
    #: the quintic's coefficients (a, b, c)
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS
    #: dtype of the Newton-Schulz iteration: "auto", "bfloat16", "float16", "float32" or "float64"
    ns_dtype: str = "auto"
    #: non-finite gradients are skipped by default
    nonfinite: str = "skip"

    def check(self) -> None:
        check_lr(self.lr)
        check_beta("momentum", self.momentum)
        check_bool("nesterov", self.nesterov)
        check_positive_int("ns_steps", self.ns_steps)
        if self.ns_steps >= 100:
            raise ValueError(f"ns_steps must be < 100, got {self.ns_steps}; 5 is the usual value")
        check_weight_decay(self.weight_decay)
        if self.adjust_lr_fn is not None:
            check_choice("adjust_lr_fn", self.adjust_lr_fn, ("match_rms_adamw", "original"))
        check_eps(self.eps)
        _check_coefficients(self.ns_coefficients)
        check_choice("ns_dtype", self.ns_dtype, tuple(_NS_DTYPES))


class Muon(OptlabOptimizer, HealthMixin, torch.optim.Muon):
    """Muon: momentum orthogonalized by Newton-Schulz, for 2-D hidden weight matrices.

    buf ← μ·buf + (1−μ)·g;  u = (1−μ)·g + μ·buf (Nesterov) or buf;  O = NewtonSchulz5(u);
    W ← W − η·λ·W − η·s·O,  s = 0.2·sqrt(max(rows, cols)) ("rms_match") or
    sqrt(max(1, rows/cols)) ("original").

    The momentum buffer is torch.optim.Muon's exponential average, (1−μ) times the plain sum
    ``buf ← μ·buf + g`` of the paper; Newton-Schulz divides u by its norm, so O is the same.

    Args:
        params: 2-D tensors, (name, tensor) pairs or param-group dicts. Anything else is refused:
            embeddings, the readout, norms and biases belong with AdamW (per-role ``mix``).
        lr: η, default 0.02.
        momentum: μ in [0, 1), default 0.95.
        nesterov: Nesterov momentum, default True.
        ns_steps: Newton-Schulz iterations in [1, 100), default 5.
        weight_decay: decoupled λ (with the pre-update W), default 0.0.
        scale: "rms_match" (default, Moonshot's: AdamW's η and λ carry over) or "original".
            Stored in each group as torch's ``adjust_lr_fn`` ("match_rms_adamw" / "original"),
            which is also the per-group override key.
        eps: floor of ‖u‖_F in the normalization, default 1e-7.
        ns_coefficients: (a, b, c), default (3.4445, −4.7750, 2.0315).
        ns_dtype: "auto" (default: bfloat16 on CUDA and on CPUs with bfloat16 units, see
            :func:`cpu_has_bf16_units`; float32 elsewhere), "bfloat16", "float16", "float32" or
            "float64". "bfloat16" reproduces torch.optim.Muon.
        nonfinite: "skip" (default: a parameter whose gradient has a NaN/inf keeps its state and
            value, counted in ``state["nonfinite_skips"]`` and reported), "raise"
            (:class:`~lightning_optlab.optim.base.NonFiniteGradientError` naming it) or "ignore".
            The check costs one host sync per step.

    Example:
        >>> lightning_optlab.configure(model, "muon", lr=0.02, mix=[
        ...     {"optimizer": "adamw", "roles": ["embedding", "readout", "norm", "bias"], "lr": 3e-3}])

    State: ``momentum_buffer`` (as the parameter: 4 B/param in float32), ``step``,
    ``nonfinite_skips``.

    Papers: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
    Liu et al. 2025, "Muon is Scalable for LLM Training" (the RMS-matching scale).
    """

    hparams_class = MuonHParams
    traits = Traits(mup_family="muon", matrix_only=True, whole_tensors=True, nonfinite="skip", skips_in_state=True)
    constructor_options = ("scale",)
    group_only = ("adjust_lr_fn",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        scale: str = "rms_match",
        eps: float = 1e-7,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_dtype: str = "auto",
        nonfinite: str = "skip",
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}, got {scale!r}")
        MuonHParams(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                    adjust_lr_fn=SCALES[scale], eps=eps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                    nonfinite=nonfinite)
        self._extra_defaults = {"ns_dtype": ns_dtype}
        self._nonfinite_default = nonfinite
        self._constructing = True
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(float(c) for c in ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=SCALES[scale],
        )
        self.defaults.update(self._extra_defaults, nonfinite=nonfinite)
        self._constructing = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking that it holds 2-D matrices only (the message says where the rest go)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params  # a generator is consumed here; torch reads the list
        names = param_group.get("param_names")
        role = param_group.get("role")
        gi = len(self.param_groups)
        for j, p in enumerate(params):
            p_t = p[1] if isinstance(p, tuple) else p
            name = p[0] if isinstance(p, tuple) else (names[j] if names is not None and j < len(names) else f"group{gi}.param{j}")
            if isinstance(p_t, Tensor) and p_t.ndim != 2:
                if looks_flattened(p_t):
                    raise ValueError(
                        f"Muon needs whole matrices, but parameter {name!r} is a 1-D view of a larger buffer, as "
                        "FSDP1 with use_orig_params=True hands out; use DDP."
                    )
                where = f" (role {role!r})" if role else ""
                raise ValueError(
                    f"Muon orthogonalizes 2-D hidden weight matrices only; parameter {name!r}{where} has shape "
                    f"{tuple(p_t.shape)}. {_ROUTE_HINT[0].upper()}{_ROUTE_HINT[1:]}"
                )
        if role in ("embedding", "readout"):
            warnings.warn(
                f"Muon was given the {role} parameters; Muon is meant for hidden matrices: {_ROUTE_HINT}",
                # the caller of Muon(...) (through torch's initializers) or of add_param_group
                stacklevel=5 if getattr(self, "_constructing", False) else 2,
            )
        for key, val in getattr(self, "_extra_defaults", {}).items():
            param_group.setdefault(key, val)
        super().add_param_group(param_group)  # also loads a torch.optim.Muon state (base load_state_dict)

    def distributed_cost(self, p: Tensor, group: dict[str, Any]) -> float:
        """Newton-Schulz work of an (m, n) matrix: ~ns_steps · m·n·min(m, n) multiply-adds."""
        m, n = (tuple(p.shape) + (1, 1))[:2]
        return float(int(group.get("ns_steps", 5)) * m * n * min(m, n))

    def _update(self) -> None:
        work = self._collect()
        if not work:
            return
        # Momentum and the Nesterov interpolation, per group (foreach), as torch.optim.Muon.
        by_group: dict[int, list[int]] = {}
        for i, (gi, _, _) in enumerate(work):
            by_group.setdefault(gi, []).append(i)
        updates: list[Optional[Tensor]] = [None] * len(work)
        for gi, idx in by_group.items():
            group = self.param_groups[gi]
            mu = float(group["momentum"])
            grads = [work[i][1].grad for i in idx]
            bufs = [self.state[work[i][1]]["momentum_buffer"] for i in idx]
            torch._foreach_lerp_(bufs, grads, 1.0 - mu)
            us = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            for i, u in zip(idx, us):
                updates[i] = u
        # Newton-Schulz, batched over matrices of one shape, dtype and iteration setting.
        buckets: dict[tuple, list[int]] = {}
        for i, (gi, p, _) in enumerate(work):
            group = self.param_groups[gi]
            key = (tuple(p.shape), p.device, _ns_dtype(group["ns_dtype"], p.device), int(group["ns_steps"]),
                   tuple(group["ns_coefficients"]), float(group["eps"]))
            buckets.setdefault(key, []).append(i)
        for (_, _, dtype, steps, coefs, eps), idx in buckets.items():
            u = updates[idx[0]].to(dtype) if len(idx) == 1 else torch.stack([updates[i].to(dtype) for i in idx])
            o = newton_schulz5(u, steps, coefs, eps)
            for k, i in enumerate(idx):
                updates[i] = o if len(idx) == 1 else o[k]
        for (gi, p, state), o in zip(work, updates):
            group = self.param_groups[gi]
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            state["step"] += 1
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            p.add_(o, alpha=-lr * muon_scale(group["adjust_lr_fn"], *out_in_shape(p)))

    def _collect(self) -> list[tuple[int, Tensor, dict[str, Any]]]:
        work = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                state.setdefault("step", 0)  # absent in a state loaded from torch.optim.Muon
                state.setdefault("nonfinite_skips", 0)
                work.append((gi, p, state))
        return work

    def _param_health(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, float]:
        # Recomputed from the momentum buffer (the next step's u without the fresh gradient):
        # orthogonality error ‖O Oᵀ − I‖_F / sqrt(n) on the short side n of the Newton-Schulz
        # output, its singular-value range, and the step's statistics.
        buf = state.get("momentum_buffer")
        if buf is None:
            return {}
        lr = float(group["lr"])
        s = muon_scale(group["adjust_lr_fn"], *out_in_shape(p))
        dtype = _ns_dtype(group["ns_dtype"], p.device)
        o = newton_schulz5(buf.to(dtype), int(group["ns_steps"]), tuple(group["ns_coefficients"]), float(group["eps"]))
        o = o.double()
        short = o if o.size(0) <= o.size(1) else o.T
        n = short.size(0)
        eye = torch.eye(n, dtype=o.dtype, device=o.device)
        sv = torch.linalg.svdvals(short)
        sigma = torch.linalg.svdvals(buf.double())
        out = {
            "ortho_error": (torch.linalg.matrix_norm(short @ short.T - eye) / math.sqrt(n)).item(),
            "ns_sv_min": sv.min().item(),
            "ns_sv_max": sv.max().item(),
            "scale": s,
            "steps": float(state.get("step", 0)),
            "nonfinite_skips": float(state.get("nonfinite_skips", 0)),
        }
        # Along the singular direction i of u the step per unit of u is η·s·σ_i(O)/σ_i(u). The
        # iteration maps each normalized singular value x = σ_i/‖u‖ on its own, x ← x(a + b x² + c x⁴),
        # so the gain σ_i(O)/σ_i(u) is Π_k (a + b x_k² + c x_k⁴)/‖u‖: finite also where σ_i = 0.
        a, b, c = group["ns_coefficients"]
        norm = max(float(torch.linalg.vector_norm(sigma)), float(group["eps"]))
        x, gain = sigma / norm, torch.ones_like(sigma)
        for _ in range(int(group["ns_steps"])):
            factor = a + b * x**2 + c * x**4
            x, gain = x * factor, gain * factor
        out.update(quantile_stats("eff_lr", lr * s * gain / norm))
        out.update(update_stats(p, lr * s * o))
        return out


@functools.lru_cache(maxsize=4)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (``avx512_bf16`` or ``amx_bf16`` among
    the flags of ``cpuinfo``; False where that file does not exist). Read once per process.

    ``torch.backends.cpu.get_cpu_capability()`` does not tell: it reports ``AVX512`` on CPUs with and
    without them, and bfloat16 matmuls are several times faster than float32 ones with them and far
    slower without.
    """
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = _NS_DTYPES[name]
    if dtype is None:
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units()):
            return torch.bfloat16
        return torch.float32
    return dtype


def _check_coefficients(coefs: Any) -> None:
    ok = isinstance(coefs, (tuple, list)) and len(coefs) == 3
    if ok:
        try:
            ok = all(math.isfinite(float(c)) for c in coefs)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"ns_coefficients must be three finite numbers (a, b, c), got {coefs!r}")
