import copy

import pytest
import torch

from lightning_optlab.optim import Adalayer, AdamW, OptimizerMix, SGD


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    return model, lambda: torch.nn.functional.mse_loss(model(x), y)


def _mix(model):
    sgd = SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    ada = Adalayer([{"params": model[2].parameters(), "role": "readout"},
                    {"params": model[1].parameters(), "role": "norm"}], lr=1e-2)
    return OptimizerMix([sgd, ada], names=["sgd", "adalayer"]), sgd, ada


def test_mix_equals_its_children_run_separately():
    m1, f1 = _problem()
    m2, f2 = _problem()
    mix, _, _ = _mix(m1)
    _, sgd, ada = _mix(m2)
    for _ in range(10):
        mix.zero_grad(); f1().backward(); mix.step()
        sgd.zero_grad(); ada.zero_grad(); f2().backward(); sgd.step(); ada.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_scheduler_drives_the_children_and_keeps_ratios():
    model, loss = _problem()
    mix, sgd, ada = _mix(model)
    sched = torch.optim.lr_scheduler.LambdaLR(mix, lambda s: 0.5 ** s)
    for _ in range(3):
        mix.zero_grad(); loss().backward(); mix.step(); sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05 / 8)
    assert ada.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)


def test_state_dict_round_trip_continues_bit_identically():
    m1, f1 = _problem()
    mix, _, _ = _mix(m1)
    for _ in range(4):
        mix.zero_grad(); f1().backward(); mix.step()
    sd = copy.deepcopy(mix.state_dict())
    saved = copy.deepcopy(m1.state_dict())
    for _ in range(4):
        mix.zero_grad(); f1().backward(); mix.step()
    m2, f2 = _problem()
    m2.load_state_dict(saved)
    mix2, _, _ = _mix(m2)
    mix2.load_state_dict(sd)
    for _ in range(4):
        mix2.zero_grad(); f2().backward(); mix2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert len(mix.state) == len(list(m1.parameters()))


def test_mismatched_state_dict_is_a_clear_error():
    model, _ = _problem()
    mix, _, _ = _mix(model)
    other = OptimizerMix([AdamW(model.parameters())])
    with pytest.raises(ValueError, match="param groups per child"):
        other.load_state_dict(mix.state_dict())


def test_a_parameter_given_two_algorithms_is_rejected():
    model, _ = _problem()
    with pytest.raises(ValueError, match="given to both 'sgd' and 'adamw'"):
        OptimizerMix([SGD(model.parameters(), lr=0.1), AdamW(model.parameters())], names=["sgd", "adamw"])


def test_health_merges_children():
    model, loss = _problem()
    mix, _, _ = _mix(model)
    mix.zero_grad(); loss().backward(); mix.step()
    h = mix.health()
    names = {k.split("/")[0] for k in h}
    assert names == {"sgd:group0.param0", "sgd:group0.param1", "adalayer:group0.param0", "adalayer:group0.param1",
                     "adalayer:group1.param0", "adalayer:group1.param1"}
