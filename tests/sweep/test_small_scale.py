"""The `small` scale of every study recipe: its token arithmetic, computed here, and its grids.

Computed, not read from the recipes' comments: the parameters of every point's model with the
tokenizer's vocabulary (the pack's own count, ``num_params``, on the ``meta`` device), the tokens
it trains on (steps x sequences per step x seq_len) and one epoch of its corpus, counted by
packing the corpus's training split with the recipe's own tokenizer, trained here as a run trains
it (``DataPipeline``: the embedded shards and the BPE, ~15 s on one core, once for all recipes).
"""

import math
from pathlib import Path

import pytest
import torch

from lightning_optlab.data import DataConfig, DataPipeline
from lightning_optlab.data.corpus import embedded_set_dir, parse_embedded
from lightning_optlab.data.reader import ShardReader
from lightning_optlab.data.stream import PackedDataset
from lightning_optlab.models import build_model
from lightning_optlab.sweep import SweepSpec, expand_points, point_config, resolve_recipe

RECIPES = Path(__file__).parents[2] / "recipes"
STUDIES = ("lr_sweep", "momentum_sweep", "adam_vs_signum", "adalayer_ablations", "soap_vs_adamw_shampoo",
           "soap_precondition_frequency", "adamw_lion_sophia_budget")
#: the small scale's model size (all parameters, embeddings included) and its least tokens per parameter
MIN_PARAMS, MAX_PARAMS, MIN_TOKENS_PER_PARAM = 300_000, 1_000_000, 10.0
QUARTER_DECADE = 0.25  # log10 step of the learning-rate grids (x 1.78)


def _small(name: str) -> tuple[dict, SweepSpec]:
    config, sweep = resolve_recipe(RECIPES / f"{name}.yaml", "small")
    return config, SweepSpec.from_dict(sweep)


def _sequences_per_step(config: dict) -> int:
    """Sequences one optimizer step consumes, over every process and accumulated micro-batch."""
    t = config["trainer"]
    per_process = config["data"]["batch_size"] * t.get("accumulate_grad_batches", 1)
    return per_process * t.get("devices", 1) * t.get("num_nodes", 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``data block -> (vocabulary, blocks of seq_len + 1 tokens in one epoch of the training split)``."""
    cache: dict[str, tuple[int, int]] = {}
    work_dir = str(tmp_path_factory.mktemp("small_scale_data"))

    def count(data: dict) -> tuple[int, int]:
        key = repr(sorted((k, v) for k, v in data.items() if k not in ("work_dir", "batch_size", "val_batches")))
        if key not in cache:
            torch.set_num_threads(1)
            cfg = DataConfig(**{**data, "work_dir": work_dir})
            pipe = DataPipeline(cfg)
            pipe.setup()  # writes the embedded shards and trains the BPE, as a run does
            sets = parse_embedded(cfg.data)
            assert sets is not None, "the small scale trains on an embedded corpus"
            reader = ShardReader([embedded_set_dir(work_dir, s) for s in sets])
            one_pass = PackedDataset(reader, pipe.tokenizer, seq_len=cfg.seq_len, batch_size=1, split="train",
                                     val_fraction=cfg.val_fraction, cycle=False)
            cache[key] = (pipe.vocab_size, sum(1 for _ in one_pass.blocks(0)))
        return cache[key]

    return count


def test_every_study_has_a_small_scale():
    for name in STUDIES:
        text = (RECIPES / f"{name}.yaml").read_text()
        assert "\n  small:\n" in text, name
        assert f"optlab sweep recipes/{name}.yaml --scale small" in text, name  # the command, in the comments


@pytest.mark.parametrize("name", STUDIES)
def test_small_scale_token_arithmetic(name, corpus):
    config, spec = _small(name)
    vocab, epoch_blocks = corpus(config["data"])
    steps, seq_len = config["trainer"]["max_steps"], config["data"]["seq_len"]
    sequences = steps * _sequences_per_step(config)
    tokens = sequences * seq_len
    # one epoch at most: no training block is seen twice (each block is seq_len + 1 tokens)
    assert sequences <= epoch_blocks, (name, sequences, epoch_blocks)
    sizes: dict[str, int] = {}
    for point in expand_points(spec):
        model = point_config(config, spec, point)["model"]["model"]
        key = repr(sorted(model.items()))
        if key not in sizes:
            with torch.device("meta"):
                sizes[key] = build_model(model, vocab_size=vocab).num_params()
        n = sizes[key]
        assert MIN_PARAMS <= n <= MAX_PARAMS, (point.name, n)
        assert tokens / n >= MIN_TOKENS_PER_PARAM, (point.name, tokens / n)
        assert seq_len <= model["block_size"], point.name


def _quarter_decades(values: list[float]) -> list[float]:
    """``log10(v) / 0.25`` of each value: integers, to rounding, on a quarter-decade lattice (3 digits kept)."""
    return [math.log10(v) / QUARTER_DECADE for v in values]


@pytest.mark.parametrize("name", STUDIES)
def test_small_scale_grids_are_quarter_decades_with_three_seeds_where_they_decide(name):
    """Learning rates on one quarter-decade lattice: a run's grid is 3 or more consecutive rates (the
    optimum bracketed), or 1 rate for a reference point (e.g. AdamW beside the Adalayer ablations);
    seed 0 everywhere, or seeds 0-2 throughout; extra seeds (``seeds_at``) are 0, 1 and 2."""
    config, spec = _small(name)
    assert spec.seeds in ([0], [0, 1, 2]), spec.seeds
    for run in spec.runs:
        grid = run.grid if run.grid is not None else spec.grid
        for entry in run.seeds_at:
            assert entry["seeds"] == [0, 1, 2], (name, run.label, entry)
        if "lr" in grid:
            k = _quarter_decades(grid["lr"])
            assert all(abs(x - round(x)) < 0.02 for x in k), (name, run.label, grid["lr"])
            assert len(k) == 1 or len(k) >= 3, (name, run.label, grid["lr"])
            assert all(abs(b - a - 1) < 0.02 for a, b in zip(k, k[1:])), (name, run.label, grid["lr"])
        else:  # a fixed rate (momentum, frequency): a point of the same lattice, 2+ values on the axis
            assert all(len(values) >= 2 for values in grid.values()) or name in FREQUENCY_BASELINE, (name, run.label)
            lr = run.optimizer.get("lr", config["optimizer"]["lr"])
            (k,) = _quarter_decades([lr])
            assert abs(k - round(k)) < 0.02, (name, run.label, lr)


#: runs that a recipe's small scale leaves out because another recipe trains the identical point:
#: recipe -> {its label: (the other recipe, its label)}
REUSED = {"adam_vs_signum": {"adam_b1=0.9_b2=0.95": ("lr_sweep", "adamw")},
          "adalayer_ablations": {"adamw": ("lr_sweep", "adamw"), "sgd": ("lr_sweep", "sgd")}}


def test_a_reused_run_is_the_other_recipes_point_exactly():
    """Adam (0.9, 0.95) beside Signum is the learning-rate sweep's AdamW: the same config, point by point."""
    for name, reused in REUSED.items():
        base, sweep = resolve_recipe(RECIPES / f"{name}.yaml", "small")
        tiny_spec = SweepSpec.from_dict(resolve_recipe(RECIPES / f"{name}.yaml", "tiny")[1])
        for label, (other, other_label) in reused.items():
            obase, osweep = resolve_recipe(RECIPES / f"{other}.yaml", "small")
            ospec = SweepSpec.from_dict(osweep)
            theirs = [p for p in expand_points(ospec) if p.label == other_label]
            run = next(r for r in tiny_spec.runs if r.label == label)
            other_run = next(r for r in ospec.runs if r.label == other_label)
            # this recipe's run, named as the other's, on the other's grid and seeds, over this recipe's small base
            spec = SweepSpec.from_dict({**sweep, "runs": [{"label": other_label, "optimizer": run.optimizer,
                                                           "config": run.config, "grid": other_run.grid,
                                                           "seeds_at": other_run.seeds_at}]})
            mine = expand_points(spec)
            assert [p.name for p in mine] == [p.name for p in theirs]
            for a, b in zip(mine, theirs):
                assert point_config(base, spec, a) == point_config(obase, ospec, b), (name, label, a.name)


#: the precondition-frequency study's small scale runs f = 100 only; its f = 10 baseline is the SOAP
#: study's point at the same rate (label -> that point), which must be the same run but for f
FREQUENCY_BASELINE = {"soap_precondition_frequency": {"soap": "soap__lr=0.01__seed=0",
                                                      "shampoo": "shampoo__lr=0.0316__seed=0"}}


def test_the_frequency_baseline_is_the_soap_studys_point_but_for_the_frequency():
    for name, baselines in FREQUENCY_BASELINE.items():
        base, sweep = resolve_recipe(RECIPES / f"{name}.yaml", "small")
        spec = SweepSpec.from_dict(sweep)
        obase, osweep = resolve_recipe(RECIPES / "soap_vs_adamw_shampoo.yaml", "small")
        ospec = SweepSpec.from_dict(osweep)
        theirs = {p.name: p for p in expand_points(ospec)}
        for label, point_name in baselines.items():
            mine = next(p for p in expand_points(spec) if p.label == label)
            cfg = point_config(base, spec, mine)
            assert cfg["optimizer"]["hparams"]["precondition_frequency"] == 100
            cfg["optimizer"]["hparams"]["precondition_frequency"] = 10
            assert cfg == point_config(obase, ospec, theirs[point_name]), (label, point_name)


def _choices(optimizer: dict) -> dict:
    """An optimizer block without what scales with the run: rates, and frozen Adalayer's freezing step."""
    hparams = {k: v for k, v in (optimizer.get("hparams") or {}).items() if k != "freeze_after"}
    mix = [{k: v for k, v in part.items() if k != "lr"} for part in optimizer.get("mix") or []]
    return {"name": optimizer.get("name"), "betas": optimizer.get("betas"), "hparams": hparams, "mix": mix}


@pytest.mark.parametrize("name", STUDIES)
def test_small_scale_keeps_the_studies_choices(name):
    """The tiny scale's optimizers and betas, the base's QK-LayerNorm and z-loss, warmup then cosine."""
    config, spec = _small(name)
    tiny_config, tiny_sweep = resolve_recipe(RECIPES / f"{name}.yaml", "tiny")
    tiny = {r.label: _choices(r.optimizer) for r in SweepSpec.from_dict(tiny_sweep).runs}
    small = {r.label: _choices(r.optimizer) for r in spec.runs}
    assert small == {label: tiny[label] for label in small}
    assert set(tiny) - set(small) == set(REUSED.get(name, {})), "a run left out at small must be reused from another recipe"
    for field in ("qk_layernorm", "z_loss"):
        assert config["model"]["model"].get(field) == tiny_config["model"]["model"].get(field), field
    opt = config["optimizer"]
    assert opt["schedule"] == "cosine" and 0 < opt["warmup_steps"] < config["trainer"]["max_steps"] // 5
