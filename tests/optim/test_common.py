"""One table over every registered optimizer (CONVENTIONS.md, tier a)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_optlab.optim import available_optimizers, get_optimizer_class

# name -> constructor kwargs for these toy problems. Adding an optimizer adds one row here.
CASES: dict[str, dict] = {
    "sgd": dict(lr=0.05, momentum=0.9),
    "adamw": dict(lr=0.05),
    "adagrad": dict(lr=0.2),
    "adafactor": dict(lr=0.05),
    "lion": dict(lr=0.01),
    "signum": dict(lr=0.01),
    "adalayer": dict(lr=0.05),
    "sophia": dict(lr=0.01),
    "adam_mini": dict(lr=0.05),
    "schedule_free_adamw": dict(lr=0.05),
    "shampoo": dict(lr=0.05, precondition_frequency=5),
    "soap": dict(lr=0.05, precondition_frequency=5),
    "muon": dict(lr=0.05),
}

# Optimizers whose first step only initializes state (SOAP, as its authors' reference does).
FIRST_STEP_INITIALIZES = {"soap"}

# Optimizers for matrices only (embeddings, norms and biases go to AdamW through the per-role mix).
MATRIX_ONLY = {"muon"}


def _eval_mode(opt):
    if hasattr(opt, "eval") and any("train_mode" in g for g in opt.param_groups):
        opt.eval()


def test_table_covers_every_registered_optimizer():
    assert sorted(CASES) == available_optimizers()


def _quadratic(seed=0, name=""):
    g = torch.Generator().manual_seed(seed)
    second = (4, 7) if name in MATRIX_ONLY else (7,)
    params = [nn.Parameter(torch.randn(6, 5, generator=g)), nn.Parameter(torch.randn(*second, generator=g))]
    scales = [torch.rand(p.shape, generator=g) * 1.5 + 0.5 for p in params]
    targets = [torch.randn(p.shape, generator=g) for p in params]

    def loss_fn():
        return sum(0.5 * (s * (p - t) ** 2).sum() for p, s, t in zip(params, scales, targets))

    return params, loss_fn


@pytest.mark.parametrize("name", sorted(CASES))
def test_decreases_a_quadratic_and_stays_finite(name):
    params, loss_fn = _quadratic(name=name)
    opt = get_optimizer_class(name)(params, **CASES[name])
    start = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    _eval_mode(opt)
    end = loss_fn().item()
    assert all(torch.isfinite(p).all() for p in params)
    assert end < 0.5 * start, f"{name}: {start:.3f} -> {end:.3f}"


def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x @ torch.randn(4, 3, generator=g))
    return model, lambda: nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", sorted(CASES))
def test_decreases_a_tiny_mlp_loss_with_param_groups(name):
    model, loss_fn = _mlp_problem()
    lr = CASES[name]["lr"]
    groups = [
        {"params": list(model[0].parameters()) + list(model[3].parameters()), "weight_decay": 0.01},
        {"params": list(model[2].parameters()), "lr": lr / 2, "weight_decay": 0.0},
    ]
    if name in MATRIX_ONLY:  # the two weight matrices, in two groups
        groups = [{"params": [model[0].weight], "weight_decay": 0.01},
                  {"params": [model[3].weight], "lr": lr / 2, "weight_decay": 0.0}]
    opt = get_optimizer_class(name)(groups, **CASES[name])
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == lr / 2
    start = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    _eval_mode(opt)
    end = loss_fn().item()
    assert end < 0.7 * start, f"{name}: {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_calls_the_closure_once_and_returns_its_loss(name):
    params, loss_fn = _quadratic(name=name)
    opt = get_optimizer_class(name)(params, **CASES[name])
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    if name in FIRST_STEP_INITIALIZES:
        opt.step(closure)
        calls.clear()
    before = [p.detach().clone() for p in params]
    out = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(out) and torch.isfinite(out)
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), "step with a closure did not move the parameters"


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_continues_bit_identically(name):
    params, loss_fn = _quadratic(seed=3, name=name)
    cls = get_optimizer_class(name)
    opt = cls(params, **CASES[name])

    def run(o, ps, lf, n):
        for _ in range(n):
            o.zero_grad()
            lf().backward()
            o.step()

    run(opt, params, loss_fn, 7)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, loss_fn, 6)

    params2, loss_fn2 = _quadratic(seed=3, name=name)
    with torch.no_grad():
        for p, s in zip(params2, saved_params):
            p.copy_(s)
    opt2 = cls(params2, **CASES[name])
    opt2.load_state_dict(saved_state)
    run(opt2, params2, loss_fn2, 6)
    for a, b in zip(params, params2):
        assert torch.equal(a, b), f"{name}: resumed run differs by {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_health_reports_finite_statistics_per_parameter(name):
    params, loss_fn = _quadratic(name=name)
    opt = get_optimizer_class(name)(params, **CASES[name])
    assert opt.health() == {} or all(torch.isfinite(torch.tensor(v)) for v in opt.health().values())
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    h = opt.health()
    for pname in ("group0.param0", "group0.param1"):
        for key in ("update_rms", "update_to_weight", "eff_lr_min", "eff_lr_q50", "eff_lr_max"):
            assert f"{pname}/{key}" in h, f"{name}: missing {pname}/{key}; got {sorted(h)[:8]}"
    assert all(v == v for v in h.values()), f"{name}: NaN in health"
    assert h["group0.param0/update_rms"] > 0
    assert h["group0.param0/eff_lr_min"] <= h["group0.param0/eff_lr_q50"] <= h["group0.param0/eff_lr_max"]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize(
    "bad, match",
    [(dict(lr=-1.0), "lr must be ≥ 0, got -1.0")],
)
def test_negative_lr_is_rejected(name, bad, match):
    params, _ = _quadratic(name=name)
    with pytest.raises(ValueError, match=match):
        get_optimizer_class(name)(params, **{**CASES[name], **bad})


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if "betas" in get_optimizer_class(n).__init__.__code__.co_varnames])
@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, -0.1)])
def test_betas_outside_unit_interval_are_rejected(name, betas):
    params, _ = _quadratic(name=name)
    with pytest.raises(ValueError, match=r"betas?|beta"):
        get_optimizer_class(name)(params, **{**CASES[name], "betas": betas})


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bad", ["0.001", True, None])
def test_lr_that_is_not_a_number_is_rejected(name, bad):
    """A string learning rate (PyYAML reads 3e-4 as one) must not slip into the update."""
    params, _ = _quadratic(name=name)
    with pytest.raises(ValueError, match="lr must be a number"):
        get_optimizer_class(name)(params, **{**CASES[name], "lr": bad})


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("key, bad", [("lr", -1.0), ("weight_decay", -0.5), ("lr", "3e-4")])
def test_bad_values_in_a_param_group_are_rejected(name, key, bad):
    """Per-group values get the constructor's checks, in the constructor's groups and in added ones."""
    params, _ = _quadratic(name=name)
    cls = get_optimizer_class(name)
    with pytest.raises(ValueError, match=key):
        cls([{"params": [params[0]], key: bad}, {"params": [params[1]]}], **CASES[name])
    opt = cls([params[0]], **CASES[name])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [params[1]], key: bad})
    assert len(opt.param_groups) == 1  # the bad group was not added
