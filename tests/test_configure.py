import pytest
import torch
import yaml

from lightning_optlab import MixPart, OptimizerSpec, configure
from lightning_optlab.optim import Adalayer, Lion, OptimizerMix, SGD


def test_configure_returns_optimizer_and_step_scheduler(tiny_lm):
    out = configure(tiny_lm, "lion", lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1,
                    schedule="cosine", warmup_steps=2, total_steps=10)
    opt, sched = out["optimizer"], out["lr_scheduler"]
    assert isinstance(opt, Lion)
    assert sched["interval"] == "step" and sched["frequency"] == 1
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    decay = {g["role"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"embedding": 0.0, "hidden": 0.1, "readout": 0.1, "norm": 0.0, "bias": 0.0}
    assert all(g["betas"] == (0.9, 0.99) for g in opt.param_groups)
    # warmup: first step at 1/3 of the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4 / 3)


def test_extra_keywords_reach_the_constructor(tiny_lm):
    opt = configure(tiny_lm, "sgd", lr=0.1, momentum=0.98, nesterov=True)["optimizer"]
    assert isinstance(opt, SGD) and opt.param_groups[0]["momentum"] == 0.98 and opt.param_groups[0]["nesterov"]


def test_betas_map_to_momentum_for_momentum_methods(tiny_lm):
    opt = configure(tiny_lm, "sgd", lr=0.1, betas=(0.98, 0.0))["optimizer"]
    assert opt.param_groups[0]["momentum"] == 0.98


def test_per_role_overrides(tiny_lm):
    opt = configure(tiny_lm, "adamw", lr=1e-3, weight_decay=0.1,
                    overrides={"readout": {"lr": 1e-2}, "embedding": {"weight_decay": 0.05}})["optimizer"]
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["readout"]["initial_lr"] == 1e-2 and groups["hidden"]["initial_lr"] == 1e-3
    assert groups["embedding"]["weight_decay"] == 0.05


def test_role_patterns_reach_grouping(tiny_lm):
    opt = configure(tiny_lm, "adamw", lr=1e-3, role_patterns={r"^wpe$": "hidden"})["optimizer"]
    hidden = next(g for g in opt.param_groups if g["role"] == "hidden")
    assert "wpe" in hidden["param_names"]


def test_mix_builds_one_optimizer_with_one_state_dict(tiny_lm, lm_batch):
    out = configure(tiny_lm, "sgd", lr=0.1, momentum=0.98,
                    mix=[{"optimizer": "adalayer", "roles": ["readout", "norm"], "lr": 3e-3}])
    opt = out["optimizer"]
    assert isinstance(opt, OptimizerMix) and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.children[0], SGD) and isinstance(opt.children[1], Adalayer)
    assert {g["role"] for g in opt.children[1].param_groups} == {"readout", "norm"}
    tiny_lm.loss(lm_batch).backward()
    opt.step()
    out["lr_scheduler"]["scheduler"].step()
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(tiny_lm.parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="adamq"), "unknown optimizer 'adamq'; known optimizers: .*adamw.*lion"),
        (dict(name="adamw", lr=-1.0), "lr must be ≥ 0, got -1.0"),
        (dict(name="adamw", betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (dict(name="adamw", eps=0.0), "eps must be > 0, got 0.0"),
        (dict(name="adamw", weight_decay=-0.1), "weight_decay must be ≥ 0, got -0.1"),
        (dict(name="adamw", schedule="cosine"), "needs total_steps"),
        (dict(name="adamw", overrides={"readouts": {"lr": 1.0}}), "unknown parameter role 'readouts'"),
        (dict(name="adamw", overrides={"readout": {"optimizer": "sgd"}}), "unknown keys \\['optimizer'\\].*use `mix`"),
        (dict(name="sgd", mix=[MixPart(optimizer="adalayer", roles=["readout"]),
                               MixPart(optimizer="lion", roles=["readout", "norm"])]),
         "role 'readout' is given two algorithms \\('adalayer' and 'lion'\\)"),
    ],
)
def test_bad_specs_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSpec(**kwargs)


def test_unknown_constructor_argument_names_the_accepted_ones(tiny_lm):
    with pytest.raises(ValueError, match="optimizer 'lion' got unknown arguments \\['momentum'\\]; it accepts: lr, betas"):
        configure(tiny_lm, "lion", lr=1e-4, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer 'sgd' takes no eps"):
        configure(tiny_lm, "sgd", lr=1e-4, eps=1e-8)


def test_mix_role_absent_from_model_warns_and_is_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with pytest.warns(UserWarning, match="lists role 'norm', but the model has no norm parameters"):
        opt = configure(model, "sgd", lr=0.1, mix=[{"optimizer": "adalayer", "roles": ["norm"]}])["optimizer"]
    assert isinstance(opt, SGD)


def test_spec_from_yaml_through_jsonargparse(tiny_lm):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(OptimizerSpec, "optimizer")
    cfg = parser.parse_string(yaml.safe_dump({"optimizer": {
        "name": "sgd", "lr": 0.1, "betas": [0.98, 0.0], "weight_decay": 0.1, "schedule": "wsd",
        "warmup_steps": 5, "total_steps": 100, "overrides": {"norm": {"lr": 0.01}},
        "mix": [{"optimizer": "adalayer", "roles": ["readout"], "lr": 0.003}],
    }}))
    spec = parser.instantiate_classes(cfg).optimizer
    assert isinstance(spec, OptimizerSpec) and isinstance(spec.mix[0], MixPart)
    opt = configure(tiny_lm, spec)["optimizer"]
    assert isinstance(opt, OptimizerMix)
    with pytest.raises(Exception, match="lr must be ≥ 0|lr"):
        parser.instantiate_classes(parser.parse_string("optimizer: {name: sgd, lr: -1.0}"))


def test_mix_part_weight_decay_applies_to_its_decayed_roles_even_without_spec_decay(tiny_lm):
    opt = configure(tiny_lm, "sgd", lr=0.1, momentum=0.9,
                    mix=[{"optimizer": "adalayer", "roles": ["readout", "norm"], "weight_decay": 0.1}])["optimizer"]
    ada = {g["role"]: g["weight_decay"] for g in opt.children[1].param_groups}
    assert ada == {"readout": 0.1, "norm": 0.0}


def test_mix_part_does_not_inherit_momentum_spelled_as_betas(tiny_lm):
    opt = configure(tiny_lm, "sgd", lr=0.1, betas=(0.98, 0.0),
                    mix=[{"optimizer": "adalayer", "roles": ["readout"]}])["optimizer"]
    assert opt.children[0].param_groups[0]["momentum"] == 0.98
    assert opt.children[1].param_groups[0]["betas"] == (0.9, 0.95)  # Adalayer's own default
    opt = configure(tiny_lm, "adamw", lr=1e-3, betas=(0.8, 0.9),
                    mix=[{"optimizer": "adalayer", "roles": ["readout"]}])["optimizer"]
    assert opt.children[1].param_groups[0]["betas"] == (0.8, 0.9)


def test_schedule_free_rejects_a_schedule():
    with pytest.raises(ValueError, match="schedule_free_adamw replaces the LR schedule; got schedule='cosine'"):
        OptimizerSpec(name="schedule_free_adamw", schedule="cosine", total_steps=10)


def test_sgd_without_momentum_reports_health(tiny_lm, lm_batch):
    opt = configure(tiny_lm, "sgd", lr=0.1)["optimizer"]
    tiny_lm.loss(lm_batch).backward()
    opt.step()
    h = opt.health()
    assert h["lm_head.weight/eff_lr_q50"] == pytest.approx(0.1)
    g = tiny_lm.lm_head.weight.grad
    assert h["lm_head.weight/update_rms"] == pytest.approx((0.1 * g).pow(2).mean().sqrt().item(), rel=1e-5)
    opt.zero_grad(set_to_none=True)  # after the step, as Lightning does: no state, no gradient
    h = opt.health()
    assert h["lm_head.weight/eff_lr_q50"] == pytest.approx(0.1) and "lm_head.weight/update_rms" not in h


def test_adagrad_reports_nothing_before_its_first_step(tiny_lm, lm_batch):
    opt = configure(tiny_lm, "adagrad", lr=0.1)["optimizer"]  # torch creates Adagrad's state here
    assert opt.health() == {}
    tiny_lm.loss(lm_batch).backward()
    opt.step()
    assert opt.health()["lm_head.weight/eff_lr_q50"] > 0


def test_numbers_from_yaml_strings_are_converted():
    """PyYAML reads 3e-4 (no dot) as a string; the spec converts numeric strings, rejects the rest."""
    spec = OptimizerSpec(**yaml.safe_load(
        "name: lion\nlr: 3e-4\nweight_decay: 1e-1\nbetas: [0.9, 0.99]\nschedule: cosine\n"
        "total_steps: 100\nwarmup_steps: '10'\noverrides: {norm: {lr: 1e-3}}\n"
    ))
    assert spec.lr == 3e-4 and isinstance(spec.lr, float) and spec.weight_decay == 0.1
    assert spec.warmup_steps == 10 and spec.overrides == {"norm": {"lr": 1e-3}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr="fast"), "lr must be a number, got 'fast'"),
        (dict(lr=None), "lr must be a number, got None"),
        (dict(lr=True), "lr must be a number"),
        (dict(warmup_steps=2.5), "warmup_steps must be a whole number"),
        (dict(betas="0.9,0.95"), "betas must be a pair"),
        (dict(role_patterns=["lm_head"]), "role_patterns must be a mapping"),
        (dict(hparams=[1]), "hparams must be a mapping"),
        (dict(mix=[dict(optimizer="adamw", roles="norm")]), "roles must be a list"),
        (dict(overrides={"norm": {"lr": "x"}}), r"overrides\['norm'\]\['lr'\] must be a number"),
    ],
)
def test_wrong_types_fail_with_a_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSpec(name="adamw", **kwargs)


@pytest.mark.parametrize(
    "name, override",
    [("adamw", {"momentum": 0.5}), ("lion", {"eps": 1e-6}), ("sgd", {"eps": 1e-6})],
)
def test_override_the_optimizer_would_ignore_is_an_error(tiny_lm, name, override):
    with pytest.raises(ValueError, match=f"overrides\\['norm'\\] sets '{next(iter(override))}'.*{name}"):
        configure(tiny_lm, name, lr=1e-3, overrides={"norm": override})
    # what the role's optimizer does take is fine (SGD's betas[0] is its momentum)
    configure(tiny_lm, "sgd", lr=1e-3, overrides={"norm": {"betas": (0.5, 0.0), "lr": 1e-2}})


def test_distribute_is_set_on_the_whole_tensor_optimizers_and_checked_before_training():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_optlab import OptimizerSpec
    from lightning_optlab.configure import build_optimizer
    from lightning_optlab.optim.base import iter_leaf_optimizers

    with pytest.raises(ValueError, match="distribute must be one of 'owner', 'replicate', got 'everywhere'"):
        OptimizerSpec(name="soap", distribute="everywhere")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerSpec(name="muon", distribute="replicate",
                                               mix=[{"optimizer": "adamw", "roles": ["norm", "bias"]}]))
    leaves = {type(o).__name__: o for o in iter_leaf_optimizers(opt)}
    assert leaves["Muon"].distribute == "replicate"
    assert leaves["AdamW"].distribute == "owner" and not leaves["AdamW"].traits.whole_tensors  # works on shards
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = torch.nn.Linear(4, 4, bias=False)
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"Muon got the shard 'weight' .* \(distribute='replicate'\); use distribute='owner'"):
            build_optimizer(lin, OptimizerSpec(name="muon", distribute="replicate"))
        build_optimizer(lin, OptimizerSpec(name="muon"))  # the default gathers shards on owner ranks
    finally:
        dist.destroy_process_group()
