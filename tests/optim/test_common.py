"""One table over every registered optimizer (CONVENTIONS.md, tier a)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_optlab.optim import available_optimizers, get_optimizer_class
from lightning_optlab.optim.base import NonFiniteGradientError

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

# Read from the optimizers' declared traits: those whose first step only initializes state (SOAP,
# as its authors' reference does), and those for matrices only (Muon: embeddings, norms and biases
# go to AdamW through the per-role mix).
FIRST_STEP_INITIALIZES = {n for n in CASES if get_optimizer_class(n).traits.first_step_initializes}
MATRIX_ONLY = {n for n in CASES if get_optimizer_class(n).traits.matrix_only}


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


def _resumed_run_matches(name, dtype=torch.float32):
    """7 steps, save, 6 more; a fresh optimizer loading the saved state from the saved weights takes
    the same 6 steps bit for bit. Returns the first optimizer (after its 7 + 6 steps)."""
    cls = get_optimizer_class(name)

    def problem():
        params, loss_fn = _quadratic(seed=3, name=name)
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(dtype)
        return params, (lambda: loss_fn().float())

    def run(o, lf, n):
        for _ in range(n):
            o.zero_grad()
            lf().backward()
            o.step()

    params, loss_fn = problem()
    opt = cls(params, **CASES[name])
    run(opt, loss_fn, 7)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, loss_fn, 6)

    params2, loss_fn2 = problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params):
            p.copy_(s)
    opt2 = cls(params2, **CASES[name])
    opt2.load_state_dict(saved_state)
    run(opt2, loss_fn2, 6)
    for a, b in zip(params, params2):
        assert torch.equal(a, b), f"{name}: resumed run differs by {(a.float() - b.float()).abs().max().item():.3e}"
    return opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_dict_round_trip_continues_bit_identically(name):
    _resumed_run_matches(name)


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


def test_traits_match_what_the_optimizers_do():
    assert FIRST_STEP_INITIALIZES == {"soap"} and MATRIX_ONLY == {"muon"}


def _steps(opt, params, loss_fn, n):
    for _ in range(n):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


# --- the non-finite policy ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_nonfinite_skip_leaves_the_parameter_and_its_state_and_reports_it(name):
    params, loss_fn = _quadratic(name=name)
    opt = get_optimizer_class(name)(params, **{**CASES[name], "nonfinite": "skip"})
    _steps(opt, params, loss_fn, 3)
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    loss_fn().backward()
    params[0].grad[1, 2] = float("nan")
    opt.step()
    assert torch.equal(params[0], before_p[0]), f"{name}: the parameter with a NaN gradient moved"
    assert not torch.equal(params[1], before_p[1]), f"{name}: the finite parameter did not step"
    after = {k: v for k, v in opt.state_dict()["state"].get(0, {}).items() if k != "nonfinite_skips"}
    assert _same(after, {k: v for k, v in before_s.get(0, {}).items() if k != "nonfinite_skips"}), name
    assert params[0].grad is not None and torch.isnan(params[0].grad).any()  # the gradient is put back
    assert opt.nonfinite_skips == 1
    assert opt.pop_nonfinite_skips() == ["parameter group0.param0"] and opt.pop_nonfinite_skips() == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_nonfinite_raise_names_the_parameter_and_changes_nothing(name):
    params, loss_fn = _quadratic(name=name)
    named = [("w.first", params[0]), ("w.second", params[1])]
    opt = get_optimizer_class(name)(named, **{**CASES[name], "nonfinite": "raise"})
    _steps(opt, params, loss_fn, 2)
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    loss_fn().backward()
    params[1].grad.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient in parameter 'w\.second'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("name", sorted(CASES))
def test_nonfinite_is_a_group_option_with_the_declared_default(name):
    params, loss_fn = _quadratic(name=name)
    cls = get_optimizer_class(name)
    opt = cls([{"params": [params[0]], "nonfinite": "ignore"}, {"params": [params[1]]}], **CASES[name])
    assert [g["nonfinite"] for g in opt.param_groups] == ["ignore", cls.traits.nonfinite]
    _steps(opt, params, loss_fn, 2)
    opt.zero_grad()
    loss_fn().backward()
    params[0].grad.view(-1)[0] = float("nan")
    opt.step()  # "ignore": not checked, not skipped
    assert opt.pop_nonfinite_skips() == [] and opt.nonfinite_skips == 0


# --- the sharding policy ---------------------------------------------------------------------------


class _Placement:
    def __init__(self, shard):
        self.shard = shard

    def is_shard(self):
        return self.shard

    def is_replicate(self):
        return not self.shard

    def __repr__(self):
        return "Shard(dim=0)" if self.shard else "Replicate()"


@pytest.mark.parametrize("name", sorted(CASES))
def test_shards_need_a_process_group_for_methods_needing_whole_tensors_and_replicated_ones_are_accepted(name):
    cls = get_optimizer_class(name)
    params, _ = _quadratic(name=name)
    params[0].placements = (_Placement(shard=False),)  # a replicated DTensor holds the whole tensor
    cls(params, **CASES[name])
    params[0].placements = (_Placement(shard=True),)
    opt = cls(params, **CASES[name])  # shards are accepted: owner ranks gather them (optim/distributed.py)
    if cls.traits.whole_tensors:
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match=r"got the shard 'group0.param0' \(placements \(Shard\(dim=0\),\)\) but "
                                             r"would compute whole-tensor updates from local shards \(no process group"):
            opt.step()


# --- low-precision state ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_parameters_state_dtype_and_round_trip(name):
    """bf16 parameters: state in float32 where the optimizer declares float32 state (kept so by
    load_state_dict), else in bf16; the resumed run is bit-identical either way."""
    opt = _resumed_run_matches(name, torch.bfloat16)
    want = torch.float32 if get_optimizer_class(name).traits.float32_state else torch.bfloat16
    for st in opt.state.values():
        for key, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                assert v.dtype == want, f"{name}: state {key!r} is {v.dtype}, expected {want}"


# --- per-group validation of every declared hyperparameter -----------------------------------------


def _declared(name):
    return [(name, key) for key in get_optimizer_class(name).hparams_class.names()]


@pytest.mark.parametrize("name, key", [nk for n in sorted(CASES) for nk in _declared(n)])
def test_every_declared_hyperparameter_is_validated_per_group(name, key):
    params, _ = _quadratic(name=name)
    cls = get_optimizer_class(name)
    with pytest.raises(ValueError, match=rf"param group 0: .*{key}"):
        cls([{"params": [params[0]], key: "not a value"}, {"params": [params[1]]}], **CASES[name])
    opt = cls([params[0]], **CASES[name])
    with pytest.raises(ValueError, match=rf"param group 1: .*{key}"):
        opt.add_param_group({"params": [params[1]], key: "not a value"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if "precondition_frequency" in get_optimizer_class(n).hparams_class.names()])
def test_precondition_frequency_zero_in_a_param_group_fails_validation(name):
    params, _ = _quadratic(name=name)
    with pytest.raises(ValueError, match="param group 1: precondition_frequency must be an integer ≥ 1, got 0"):
        get_optimizer_class(name)([{"params": [params[0]]}, {"params": [params[1]], "precondition_frequency": 0}],
                                  **CASES[name])


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_registered_optimizer_has_a_docs_entry():
    """Adding an optimizer adds its section to docs/optimizers.md (CONVENTIONS.md item 4)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    missing = [n for n in available_optimizers() if f"\n## `{n}`" not in text]
    assert not missing, f"no '## `name`' section in docs/optimizers.md for {missing}"
