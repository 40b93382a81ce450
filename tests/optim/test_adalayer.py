"""Adalayer: float64 re-derivation, exact AdamW identity, frozen denominators, validation, state, health."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lightning_optlab.optim.adalayer import Adalayer

BETAS, EPS = (0.9, 0.95), 1e-8


def _param(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))


def _grad(p: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """A random gradient whose scale varies by row (orders of magnitude), so blocks matter."""
    g = torch.Generator().manual_seed(10_000 * seed + step)
    noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
    if p.dim() == 0:
        return noise
    scale = torch.rand(p.shape[0], generator=g, dtype=p.dtype).mul(4).exp()
    return noise * scale.view(-1, *([1] * (p.dim() - 1)))


def _set_grads(params, step):
    grads = [_grad(p, step, i) for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return grads


class _Reference:
    """Adalayer re-derived in float64, one parameter at a time, the block reduction written out."""

    def __init__(self, params, blocks, hps, freeze=None):
        # blocks: "tensor" | "row" | "coordinate" per param; hps: (lr, wd) per param; freeze: step or None per param
        self.params, self.blocks, self.hps = params, blocks, hps
        self.freeze = freeze or [None] * len(params)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [None] * len(params)
        self.t = 0

    def _mean_sq(self, g, block):
        if block == "coordinate" or (block == "row" and g.dim() == 1):
            return g * g
        if block == "row":
            return (g * g).reshape(g.shape[0], -1).mean(dim=1).view(-1, *([1] * (g.dim() - 1)))
        return (g * g).mean()

    @torch.no_grad()
    def step(self, grads, lr_scale=1.0):
        b1, b2 = BETAS
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            lr, wd = self.hps[i]
            lr *= lr_scale
            frz = self.freeze[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            if frz is None or self.t <= frz:
                prev = self.v[i] if self.v[i] is not None else 0.0
                self.v[i] = b2 * prev + (1 - b2) * self._mean_sq(g, self.blocks[i])
            tv = self.t if frz is None else min(self.t, frz)
            denom = (self.v[i] / (1 - b2**tv)).sqrt() + EPS
            p.copy_(p - lr * wd * p - lr * (self.m[i] / (1 - b1**self.t)) / denom)


def test_matches_float64_rederivation():
    shapes = [(6, 5), (7,), (2, 3, 4), (9, 5), (9,), (4, 3), (3,)]
    params = [_param(s, i) for i, s in enumerate(shapes)]
    ref_params = [p.detach().clone() for p in params]
    groups = [
        {"params": params[0:3], "role": "hidden", "weight_decay": 0.1},  # tensor blocks
        {"params": params[3:5], "role": "readout", "lr": 3e-3},  # rows; the bias per coordinate
        {"params": params[5:6], "block": "row", "lr": 2e-3, "weight_decay": 0.05},  # rows by option
        {"params": params[6:7], "role": "norm"},  # tensor
    ]
    opt = Adalayer(groups, lr=1e-2, betas=BETAS, eps=EPS)
    blocks = ["tensor"] * 3 + ["row"] * 3 + ["tensor"]
    hps = [(1e-2, 0.1)] * 3 + [(3e-3, 0.0)] * 2 + [(2e-3, 0.05), (1e-2, 0.0)]
    ref = _Reference(ref_params, blocks, hps)
    for step in range(25):
        _set_grads(params, step)
        opt.step()
        ref.step([_grad(p, step, i) for i, p in enumerate(ref_params)])
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13, msg=lambda m, i=i: f"param {i}: {m}")
    assert [opt.state[p]["block_exp_avg_sq"].numel() for p in params] == [1, 1, 1, 9, 9, 4, 1]


def test_coordinate_blocks_equal_torch_adamw():
    shapes = [(6, 5), (7,), (2, 3, 4), (9, 5)]
    params = [_param(s, i, torch.float32) for i, s in enumerate(shapes)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0},
    ]
    opt = Adalayer(groups(params), betas=BETAS, eps=EPS, block="coordinate")
    ref = torch.optim.AdamW(groups(twins), betas=BETAS, eps=EPS, foreach=True)
    for step in range(25):
        grads = _set_grads(params, step)
        for q, g in zip(twins, grads):
            q.grad = g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_frozen_denominators():
    names = ["hidden", "hidden_adaptive", "readout", "norm", "readout_frozen"]
    params = {n: _param((5, 4) if n != "norm" else (4,), i) for i, n in enumerate(names)}
    ref_params = [p.detach().clone() for p in params.values()]
    groups = [
        {"params": [("hidden", params["hidden"])], "role": "hidden", "weight_decay": 0.1},
        {"params": [("hidden_adaptive", params["hidden_adaptive"])], "role": "hidden", "adaptive": True},
        {"params": [("readout", params["readout"])], "role": "readout"},
        {"params": [("norm", params["norm"])], "role": "norm"},
        {"params": [("readout_frozen", params["readout_frozen"])], "role": "readout", "adaptive": False},
    ]
    k = 5
    opt = Adalayer(groups, lr=1e-2, freeze_after=k)
    frozen = {"hidden": True, "hidden_adaptive": False, "readout": False, "norm": False, "readout_frozen": True}
    ref = _Reference(
        ref_params,
        ["tensor", "tensor", "row", "tensor", "row"],
        [(1e-2, 0.1)] + [(1e-2, 0.0)] * 4,
        freeze=[k if frozen[n] else None for n in names],
    )
    plist = list(params.values())
    history = []
    for step in range(12):
        lr_scale = 1.0 if step < 8 else 0.5  # a schedule after the freeze still scales the step
        for group in opt.param_groups:
            group["lr"] = 1e-2 * lr_scale
        _set_grads(plist, step)
        opt.step()
        ref.step([_grad(p, step, i) for i, p in enumerate(ref_params)], lr_scale)
        health = opt.health()
        history.append({n: torch.tensor([health[f"{n}/block_eff_lr_{q}"] for q in ("min", "q50", "max")]) / lr_scale for n in names})
        for n in names:
            assert health[f"{n}/frozen"] == float(frozen[n] and step + 1 >= k)
    for p, q in zip(plist, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for n in names:
        after = [h[n] for h in history[k - 1 :]]  # lr-normalized block effective lrs from step k on
        same = all(torch.allclose(a, after[0], rtol=1e-12, atol=0) for a in after)
        assert same == frozen[n], n
        v = opt.state[params[n]]["block_exp_avg_sq"]
        assert v.numel() == (5 if n.startswith("readout") else 1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(lr=-1.0), "-1.0"),
        (dict(betas=(1.0, 0.95)), "1.0"),
        (dict(betas=(0.9,)), "(0.9,)"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "-0.1"),
        (dict(block="col"), "'col'"),
        (dict(freeze_after=0), "freeze_after"),
        (dict(freeze_after=2.5), "2.5"),
    ],
)
def test_bad_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Adalayer([torch.nn.Parameter(torch.randn(3, 2))], **kwargs)


def test_bad_group_options():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="'rows'"):
        Adalayer([{"params": [p], "block": "rows"}])
    with pytest.raises(ValueError, match="adaptive"):
        Adalayer([{"params": [p], "adaptive": "yes"}])
    with pytest.raises(ValueError, match="-0.5"):
        Adalayer([{"params": [p], "lr": -0.5}])


@pytest.mark.parametrize("freeze_after", [None, 3])
def test_state_dict_round_trip_is_bit_identical(freeze_after):
    shapes = [(6, 5), (7,), (2, 3, 4), (9, 5)]
    params = [_param(s, i, torch.float32) for i, s in enumerate(shapes)]

    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "role": "readout"}]

    opt = Adalayer(groups(params), lr=1e-2, freeze_after=freeze_after)
    for step in range(4):
        _set_grads(params, step)
        opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Adalayer(groups(clone), lr=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(4, 9):
        grads = _set_grads(params, step)
        for q, g in zip(clone, grads):
            q.grad = g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def test_health():
    w, b, head = _param((6, 5), 0), _param((6,), 1), _param((9, 5), 2)
    opt = Adalayer(
        [{"params": [("w", w), ("b", b)]}, {"params": [("head", head)], "role": "readout"}], lr=1e-2, freeze_after=100
    )
    assert opt.health() == {}
    for step in range(3):
        _set_grads([w, b, head], step)
        opt.step()
    health = opt.health()
    assert all(torch.isfinite(torch.tensor(v)) for v in health.values())
    assert health["w/n_blocks"] == 1 and health["b/n_blocks"] == 1 and health["head/n_blocks"] == 9
    assert health["w/frozen"] == 0.0
    assert health["w/block_eff_lr_min"] == health["w/block_eff_lr_max"] == pytest.approx(health["w/eff_lr_q50"])
    # the readout's rows see gradients of very different scale: their effective lrs spread out
    assert health["head/block_eff_lr_max"] > 2 * health["head/block_eff_lr_min"]
    for n in ("w", "b", "head"):
        assert health[f"{n}/eff_lr_min"] <= health[f"{n}/eff_lr_q50"] <= health[f"{n}/eff_lr_max"]
        assert 0 < health[f"{n}/update_rms"] and 0 < health[f"{n}/update_to_weight"]
        assert health[f"{n}/eps_frac"] == 0.0


def test_closure_missing_grads_and_sparse():
    w = torch.nn.Parameter(torch.randn(3, 2))
    unused = torch.nn.Parameter(torch.randn(3))
    opt = Adalayer([w, unused])
    before = unused.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() > 0
    assert torch.equal(unused, before) and not opt.state[unused]
    emb = torch.nn.Embedding(4, 3, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Adalayer(emb.parameters()).step()
