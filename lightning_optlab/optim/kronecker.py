"""Kronecker-factor building blocks shared by SOAP and Shampoo.

A tensor ``G`` of shape ``(d_0, ..., d_{k-1})`` gets one factor per dimension ``i`` that is
preconditioned: ``F_i ≈ E[G_(i) G_(i)ᵀ]``, the ``d_i × d_i`` contraction of ``G`` with itself over
every other dimension (for a matrix: ``L = G Gᵀ`` for rows, ``R = Gᵀ G`` for columns). Bases
``Q_i`` (eigenvectors of ``F_i``) rotate a tensor dimension by dimension: ``Q_Lᵀ G Q_R`` and back
``Q_L N Q_Rᵀ``.

Conventions (those of SOAP's reference implementation, Vyas et al. 2024):

* ``merge_dims`` merges consecutive dimensions while their product stays ≤ ``max_precond_dim``
  (:func:`merged_shape`); dimensions larger than ``max_precond_dim`` get no factor and are left
  unrotated; 1-D tensors get a factor only with ``precondition_1d`` (:func:`factor_mask`).
* Factor lists hold ``None`` where a dimension has no factor; basis lists likewise.
* Low-precision (bf16/fp16) inputs are computed in float32: the decompositions need it.

The factor state both methods keep per tensor is made, updated and scheduled here too
(:func:`work_shape`, :func:`new_factors`, :func:`update_factor_states_`, :func:`refresh_due`,
:func:`mark_refreshed`, :func:`timed`), over the optimizer's per-parameter state dicts and their
keys ``factors`` (a list, ``None`` where a dimension has none), ``step``, ``last_refresh`` and
``fallbacks``. What each method computes from the factors stays its own: Shampoo's inverse roots
and grafting, SOAP's eigenbases, their QR refresh and the rotation of its Adam moments.

Everything here is plain torch over tensors and dicts; the optimizers own groups and validation.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, MutableMapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "merged_shape",
    "factor_mask",
    "work_shape",
    "new_factors",
    "update_factor_states_",
    "refresh_due",
    "mark_refreshed",
    "timed",
    "gram",
    "update_factors_",
    "project",
    "project_matrices",
    "safe_eigh",
    "eigenbasis",
    "power_qr_refresh",
    "cholesky_qr2",
    "cholesky_qr2_batched",
    "power_qr_refresh_batched",
    "condition_number",
    "factor_health",
    "side_names",
    "DEFAULT_JITTER",
]

#: relative jitter (times the mean diagonal) added on the last eigendecomposition retry
DEFAULT_JITTER = 1e-6
# SOAP's reference adds 1e-30·I before its first eigendecomposition (a no-op above ~1e-23).
_EIGH_SHIFT = 1e-30


def merged_shape(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product stays ≤ ``max_precond_dim``.

    SOAP's ``merge_dims`` rule, scanning left to right: a dimension joins the running block if
    the product stays ≤ ``max_precond_dim``; otherwise the block is closed and a new one starts
    (a dimension already above the limit stands alone). ``(64, 3, 3)`` → ``(576,)`` under 10000,
    ``(128, 64, 3, 3)`` → ``(128, 576)`` under 1000; a 0-d shape becomes ``(1,)``.
    """
    out: list[int] = []
    cur = 1
    for size in shape:
        if cur * size > max_precond_dim:
            if cur > 1:
                out.append(cur)
                cur = size
            else:
                out.append(size)
                cur = 1
        else:
            cur *= size
    if cur > 1 or not out:
        out.append(cur)
    return tuple(out)


def factor_mask(
    shape: Sequence[int], max_precond_dim: int, precondition_1d: bool, merge_dims: bool = False
) -> list[bool]:
    """Which dimensions get a factor: those of size ≤ ``max_precond_dim``.

    A 1-D ``shape`` gets one only with ``precondition_1d``. With ``merge_dims`` the mask is over
    :func:`merged_shape` of a ≥ 2-D (or 0-D) ``shape`` (the 1-D rule looks at the original
    shape, as the reference does: a matrix merged into one dimension keeps its factor).
    """
    if len(shape) == 1:
        return [bool(precondition_1d) and shape[0] <= max_precond_dim]
    dims = merged_shape(shape, max_precond_dim) if merge_dims else tuple(shape)
    return [d <= max_precond_dim for d in dims]


def work_shape(shape: Sequence[int], max_precond_dim: int, merge_dims: bool) -> tuple[int, ...]:
    """The shape a tensor's factors are made for: :func:`merged_shape` with ``merge_dims`` (a
    vector is never merged), else ``shape`` itself. Gradients and anything rotated or
    preconditioned are reshaped to it."""
    if merge_dims and len(shape) != 1:
        return merged_shape(tuple(shape), max_precond_dim)
    return tuple(shape)


def new_factors(
    shape: Sequence[int], max_precond_dim: int, precondition_1d: bool, merge_dims: bool, *,
    dtype: torch.dtype, device: Union[torch.device, str, None],
) -> list[Optional[Tensor]]:
    """Zero factors ``d × d`` for the dimensions of :func:`work_shape` that :func:`factor_mask`
    preconditions, ``None`` for the others (all ``None`` when none is)."""
    dims = work_shape(shape, max_precond_dim, merge_dims)
    mask = factor_mask(tuple(shape), max_precond_dim, precondition_1d, merge_dims)
    return [torch.zeros(d, d, dtype=dtype, device=device) if keep else None for d, keep in zip(dims, mask)]


def refresh_due(step: int, frequency: int, first: int) -> bool:
    """Whether a refresh falls on ``step``: at ``first``, ``first + frequency``, ... (none before ``first``)."""
    return step >= first and (step - first) % frequency == 0


def update_factor_states_(
    states: Sequence[MutableMapping[str, Any]], grads: Sequence[Tensor], beta: Optional[float], *,
    frequency: int, first: Union[int, Sequence[int]],
) -> list[int]:
    """One step of every tensor's factors: :func:`update_factors_` (EMA with ``beta``, sum when
    None) of ``state["factors"]`` with its gradient, already in :func:`work_shape`; returns the
    indices of the tensors whose refresh is due at their ``state["step"]`` (:func:`refresh_due`
    with ``first``, one for all or one per tensor). States without a factor are skipped."""
    due: list[int] = []
    for i, (state, grad) in enumerate(zip(states, grads)):
        factors = state.get("factors")
        if factors is None or all(f is None for f in factors):
            continue
        update_factors_(factors, grad, beta)
        if refresh_due(state["step"], frequency, first if isinstance(first, int) else first[i]):
            due.append(i)
    return due


def mark_refreshed(state: MutableMapping[str, Any], fallbacks: int = 0) -> None:
    """Book a refresh of ``state``'s factors at its current step, with ``fallbacks`` more
    decompositions that needed a retry or kept the previous result."""
    state["last_refresh"] = state["step"]
    if fallbacks:
        state["fallbacks"] = state.get("fallbacks", 0) + fallbacks


def timed(work: Callable[[], Any], sync: Optional[torch.device] = None) -> float:
    """Run ``work()`` and return its host seconds (the optimizers' ``last_refresh_seconds``).
    With ``sync`` a CUDA device, it is synchronized before the clock stops, so that the
    refresh's kernels are counted."""
    t0 = time.perf_counter()
    work()
    if sync is not None and sync.type == "cuda":
        torch.cuda.synchronize(sync)
    return time.perf_counter() - t0


def gram(grad: Tensor, dim: int) -> Tensor:
    """G_(dim) G_(dim)ᵀ: the contraction of ``grad`` with itself over every dimension but ``dim``.

    For a matrix ``G Gᵀ`` (dim 0) or ``Gᵀ G`` (dim 1); for a vector the outer product ``g gᵀ``.
    Computed in float32 for low-precision inputs. The product is not symmetrized (as the
    reference: it feeds the eigendecompositions bit for bit).
    """
    g = grad.float() if grad.dtype in (torch.bfloat16, torch.float16) else grad
    if g.dim() == 1:
        return torch.outer(g, g)
    if g.dim() == 2:
        return g @ g.T if dim == 0 else g.T @ g
    others = [d for d in range(g.dim()) if d != dim]
    return torch.tensordot(g, g, dims=(others, others))


def update_factors_(factors: Sequence[Optional[Tensor]], grad: Tensor, beta: Optional[float]) -> None:
    """F_i ← lerp(F_i, G_(i) G_(i)ᵀ, 1 − β) (an EMA), or F_i ← F_i + G_(i) G_(i)ᵀ when β is None.

    In place, for every ``i`` with ``factors[i]`` not None; ``grad`` must already have the
    (merged) shape the factors were made for. Matrices and vectors use one fused
    ``addmm_``/``addr_`` (β·F + (1−β)·G Gᵀ: equal to the lerp up to float rounding, without the
    temporary Gram matrix); n-d tensors contract with :func:`gram` and lerp.
    """
    if len(factors) != grad.dim():
        raise ValueError(f"got {len(factors)} factors for a gradient of shape {tuple(grad.shape)}")
    for i, f in enumerate(factors):
        if f is None:
            continue
        keep, add = (1.0, 1.0) if beta is None else (beta, 1.0 - beta)
        g = grad.to(f.dtype)
        if g.dim() == 1:
            f.addr_(g, g, beta=keep, alpha=add)
        elif g.dim() == 2:
            a, b = (g, g.T) if i == 0 else (g.T, g)
            f.addmm_(a, b, beta=keep, alpha=add)
        elif beta is None:
            f.add_(gram(g, i))
        else:
            f.lerp_(gram(g, i), add)


def project(x: Tensor, bases: Sequence[Optional[Tensor]], transpose: bool) -> Tensor:
    """Rotate every dimension ``i`` that has a basis: by ``Q_iᵀ`` (``transpose=True``, into the
    basis) or by ``Q_i`` (back). A matrix becomes ``Q_Lᵀ X Q_R`` or ``Q_L X Q_Rᵀ``.

    ``x`` must have the (merged) shape the bases were made for; dimensions without a basis are
    left as they are. Returns a new tensor (or ``x`` itself when no dimension has a basis).
    """
    if all(q is None for q in bases):
        return x
    if x.dim() == 2 and len(bases) == 2:
        ql, qr = bases
        if ql is not None:
            x = (ql.T if transpose else ql) @ x
        if qr is not None:
            x = x @ (qr if transpose else qr.T)
        return x
    if x.dim() <= 1:
        q = bases[0]
        v = x.reshape(-1)
        return ((q.T if transpose else q) @ v).reshape(x.shape)
    # n-d: contract one dimension at a time; tensordot moves the new dimension to the end, so
    # after a full pass over the dimensions the original order is back.
    for q in bases:
        if q is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:
            x = torch.tensordot(x, q, dims=([0], [0 if transpose else 1]))
    return x


def project_matrices(x: Tensor, left: Optional[Tensor], right: Optional[Tensor], transpose: bool) -> Tensor:
    """Batched :func:`project` for a stack of matrices ``x`` (B, m, n) with stacked bases
    ``left`` (B, m, m) and ``right`` (B, n, n), either possibly None: ``Q_Lᵀ X Q_R`` per slice
    (``transpose=True``) or ``Q_L X Q_Rᵀ``, by ``bmm``."""
    if left is not None:
        x = torch.bmm(left.transpose(1, 2) if transpose else left, x)
    if right is not None:
        x = torch.bmm(x, right if transpose else right.transpose(1, 2))
    return x


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _try_eigh(matrix: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    try:
        evals, evecs = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        return None
    return (evals, evecs) if _finite(evals, evecs) else None


def safe_eigh(matrix: Tensor, eps_jitter: float = DEFAULT_JITTER) -> tuple[Tensor, Tensor, bool]:
    """Symmetric eigendecomposition (ascending eigenvalues) that never returns non-finite values.

    Tried in the matrix's precision (float32 for bf16/fp16), then in float64, then in float64
    with ``eps_jitter·(mean |diag| + 1)·I`` added; if all fail (e.g. the matrix itself is not
    finite) the result is the identity basis with the diagonal's finite part as eigenvalues.
    Returns ``(eigenvalues, eigenvectors, fell_back)`` in the working precision; ``fell_back`` is
    True when the first attempt did not succeed. Reads one flag from the device per attempt.
    """
    work = matrix.float() if matrix.dtype in (torch.bfloat16, torch.float16) else matrix
    out = _try_eigh(work)
    if out is not None:
        return out[0], out[1], False
    m64 = work.double()
    out = _try_eigh(m64)
    if out is None and eps_jitter > 0 and _finite(m64):
        scale = m64.diagonal().abs().mean() + 1.0
        eye = torch.eye(m64.shape[0], dtype=m64.dtype, device=m64.device)
        out = _try_eigh(m64 + eps_jitter * scale * eye)
    if out is not None:
        return out[0].to(work.dtype), out[1].to(work.dtype), True
    diag = torch.nan_to_num(work.diagonal(), nan=0.0, posinf=0.0, neginf=0.0).clone()
    return diag, torch.eye(work.shape[0], dtype=work.dtype, device=work.device), True


def eigenbasis(factor: Tensor) -> tuple[Tensor, Tensor, bool]:
    """SOAP's first basis: eigenvectors of ``F + 1e-30·I``, columns by descending eigenvalue.

    The first attempt is exactly the reference's call (``torch.linalg.eigh`` in float32 on the
    factor's device, then the columns flipped); failures go through :func:`safe_eigh`'s float64
    and jitter retries. Returns ``(eigenvalues_descending, Q, fell_back)`` in float32 (or the
    factor's dtype if wider).
    """
    work = factor.float() if factor.dtype in (torch.bfloat16, torch.float16) else factor
    shifted = work + _EIGH_SHIFT * torch.eye(work.shape[0], dtype=work.dtype, device=work.device)
    evals, evecs, fell_back = safe_eigh(shifted)
    return evals.flip(0), evecs.flip(1), fell_back


def _try_qr(y: Tensor) -> Optional[Tensor]:
    """Householder QR's Q, or None. On the CPU by ``geqrf`` + ``householder_product``: the same
    LAPACK calls as ``torch.linalg.qr`` (bit for bit the same Q), without forming R (~5% less)."""
    try:
        if y.device.type == "cpu":
            q = torch.linalg.householder_product(*torch.geqrf(y))
        else:
            q = torch.linalg.qr(y)[0]
    except RuntimeError:
        return None
    return q if _finite(q) else None


def cholesky_qr2(y: Tensor) -> Optional[Tensor]:
    """The Q factor of ``y`` by CholeskyQR2: ``R = chol(YᵀY)``, ``Q = Y R⁻¹``, done twice.

    Matrix products, a Cholesky factorization and a triangular solve (fast and batchable on an
    accelerator, unlike Householder QR). Equal to Householder QR's Q up to column signs and
    rounding when ``y`` is well conditioned; returns None when a Cholesky factorization fails
    (``y`` rank-deficient or too ill-conditioned for the precision) or the result is not finite.
    """
    q = y
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        if bool((info != 0).any()):
            return None
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q if _finite(q) else None


def cholesky_qr2_batched(y: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`cholesky_qr2` of each matrix of a (B, m, n) stack: ``(Q, ok)``, ``ok`` a (B,) bool
    tensor (False where a Cholesky factorization failed or Q is not finite; Q is then unusable).
    No device read."""
    q = y
    ok = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        ok &= info == 0
        r = torch.where(ok[:, None, None], r, eye)  # keep the failed ones' solve harmless
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    ok &= torch.isfinite(q).flatten(1).all(1)
    return q, ok


def power_qr_refresh_batched(factors: Tensor, bases: Tensor, method: str = "cholesky_qr") -> tuple[Tensor, Tensor, list[bool]]:
    """:func:`power_qr_refresh` over a (B, d, d) stack of factors and bases: one ``bmm`` for
    ``F Q``, then CholeskyQR2 for the whole stack (``method="cholesky_qr"``, one device read)
    and Householder QR (then float64) one by one for the matrices it failed on. Returns
    ``(Q_new, order, ok)`` with ``order`` (B, d) and ``ok[b]`` False where every QR failed.
    """
    fq = torch.bmm(factors, bases)
    est = (bases * fq).sum(1)
    order = torch.argsort(est, dim=1, descending=True)
    y = torch.gather(fq, 2, order[:, None, :].expand_as(fq))
    if method == "cholesky_qr":
        q, ok_t = cholesky_qr2_batched(y)
        ok = ok_t.tolist()
    else:
        q, ok = torch.empty_like(y), [False] * y.shape[0]
    for b in range(y.shape[0]):
        if ok[b]:
            continue
        qb = _try_qr(y[b])
        if qb is None:
            q64 = _try_qr(y[b].double())
            qb = None if q64 is None else q64.to(y.dtype)
        if qb is not None:
            q[b] = qb
            ok[b] = True
    return q, order, ok


def power_qr_refresh(
    factor: Tensor, basis: Tensor, fq: Optional[Tensor] = None, method: str = "qr"
) -> tuple[Optional[Tensor], Tensor]:
    """One power-iteration step with QR, warm-started from ``basis`` (SOAP's refresh).

    ``d = diag(Qᵀ F Q)`` (computed as the column sums of ``Q ⊙ F Q``, which reuses ``F Q``);
    ``order = argsort(d, descending)``; ``Q_new = qr(F Q[:, order]).Q``. ``fq`` may pass a
    precomputed ``F Q``. ``method="cholesky_qr"`` tries :func:`cholesky_qr2` first (same basis
    up to signs and rounding where ``F Q`` is well conditioned) and falls back to Householder QR.
    Returns ``(Q_new, order)``; ``Q_new`` is None when the QR fails or is not finite in the
    working precision and in float64 (keep the old basis then). The caller permutes the matching
    axis of anything stored in the basis by ``order``.
    """
    work_f = factor.float() if factor.dtype in (torch.bfloat16, torch.float16) else factor
    work_q = basis.to(work_f.dtype)
    if fq is None:
        fq = work_f @ work_q
    est = (work_q * fq).sum(0)
    order = torch.argsort(est, descending=True)
    y = fq.index_select(1, order)
    q = cholesky_qr2(y) if method == "cholesky_qr" else None
    if q is None:
        q = _try_qr(y)
    if q is None:
        q64 = _try_qr(y.double())
        q = None if q64 is None else q64.to(work_f.dtype)
    return q, order


def condition_number(eigenvalues: Tensor, floor: float = 0.0) -> float:
    """max|λ| / max(min|λ|, floor) (inf when the denominator is 0)."""
    lam = eigenvalues.detach().abs().double()
    lo = max(float(lam.min()), floor)
    hi = float(lam.max())
    return hi / lo if lo > 0 else (0.0 if hi == 0 else math.inf)


def side_names(order: int) -> list[str]:
    """Names of a tensor's factors in health keys: ``L``, ``R`` for a matrix, ``F0``, ``F1``, ... otherwise."""
    return ["L", "R"] if order == 2 else [f"F{i}" for i in range(order)]


def factor_health(side: str, factor: Tensor, basis: Optional[Tensor], eps: float) -> dict[str, float]:
    """Statistics of one Kronecker factor F, shared by Shampoo and SOAP (one set of keys).

    ``cond_X`` = (λ_max⁺ + ε)/(λ_min⁺ + ε) and ``min_eig_over_eps_X`` = λ_min/ε from the exact
    eigenvalues of the current F (float64); ``staleness_X`` = ‖offdiag(Qᵀ F Q)‖_F / ‖F‖_F with Q
    the basis the method uses now (SOAP's rotation, the eigenbasis of Shampoo's current root):
    0 right after a refresh, growing as F drifts. A non-finite F reports nothing.
    """
    f = factor.double()
    if not bool(torch.isfinite(f).all()):
        return {}
    lam = torch.linalg.eigvalsh(f)
    lo, hi = float(lam[0]), float(lam[-1])
    out = {f"cond_{side}": (max(hi, 0.0) + eps) / (max(lo, 0.0) + eps), f"min_eig_over_eps_{side}": lo / eps}
    if basis is not None:
        q = basis.double()
        rotated = q.T @ f @ q
        off = float(torch.linalg.matrix_norm(rotated - torch.diag_embed(rotated.diagonal())))
        norm = float(torch.linalg.matrix_norm(f))
        out[f"staleness_{side}"] = off / norm if norm > 0 else 0.0
    return out
