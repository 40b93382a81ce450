"""The μP experiment loop runs each optimizer's declared training-step hook and evaluation mode."""

from __future__ import annotations

import torch

from lightning_optlab import configure
from lightning_optlab.mup.experiment import fixed_batches, train_run, width_model


def _model():
    return width_model({"preset": "llama-tiny", "n_layer": 1, "block_size": 16}, 32, mup=False, base_width=32, seed=0)


def test_train_run_runs_sophias_estimate():
    made = {}

    def make(m):
        made["opt"] = configure(m, "sophia", lr=1e-3, update_period=1)["optimizer"]
        return made["opt"]

    losses = train_run(_model(), make, fixed_batches(2, 2, 16, seed=0), 3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    states = [s for s in made["opt"].state.values() if "hessian" in s]
    assert states and all(s["hessian_step"] == 2 for s in states)  # estimated at step counts 1 and 2
    assert any(bool(s["hessian"].abs().sum() > 0) for s in states)


def test_train_run_ends_schedule_free_in_eval_mode():
    made = {}

    def make(m):
        made["opt"] = configure(m, "schedule_free_adamw", lr=1e-3)["optimizer"]
        return made["opt"]

    model = _model()
    train_run(model, make, fixed_batches(2, 2, 16, seed=0), 3)
    assert made["opt"].train_mode is False  # the model holds x, the weights to evaluate
