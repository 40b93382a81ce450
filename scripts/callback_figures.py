"""Draw one figure per callback of the pack, from short runs of the demo's model on the CPU.

    python scripts/callback_figures.py --out docs/img            # about 5 minutes on 2 cores

Every run trains the demo's GPT (2 layers x 64 wide, byte vocabulary) on the embedded corpus
(CPython's bundled documentation), 16 x 64 tokens a step, one torch thread. Figures written:

* ``callback_wallclock.png`` (``WallClock``): where each optimizer's step time goes (data,
  forward+backward, optimizer step and its preconditioner refresh, other) and tokens/s;
* ``callback_stability.png`` (``StabilityMonitor``): max attention logit per layer and the
  output log-partition at a high learning rate, without and with QK-LayerNorm and z-loss;
* ``callback_nonfinite.png`` (``NonFiniteGuard``): the training loss when NaN gradients arrive
  at a few steps, unguarded vs ``NonFiniteGuard(action="skip")``;
* ``callback_schedule_free.png`` (``ScheduleFreeModeSwitch``): held-out loss at the
  Schedule-Free evaluation weights x (what the switch evaluates and checkpoints) and at the
  training weights y.

The ``PreconditionerHealth`` figures come from the command in ``docs/callbacks.md``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

SEQ, BATCH, VOCAB = 64, 16, 256


def _windows(steps: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    from lightning_optlab.demo import embedded_corpus

    text = "".join(t for _, t in embedded_corpus()).encode()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    cut = int(0.95 * len(tokens))  # the last 5% is held out
    starts = torch.randint(0, cut - SEQ - 1, (steps * BATCH,), generator=g)
    held = torch.randint(cut, len(tokens) - SEQ - 1, (64,), generator=g)
    return [tokens[s: s + SEQ + 1] for s in starts], torch.stack([tokens[s: s + SEQ + 1] for s in held])


def _fit(spec: dict[str, Any], steps: int, callbacks: list[Any], *, model_kw: dict[str, Any] | None = None,
         root: str, seed: int = 0) -> tuple[Any, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lightning_optlab import OptimizerSpec
    from lightning_optlab.lit import CausalLMModule
    from lightning_optlab.models import GPT, GPTConfig

    L.seed_everything(seed, verbose=False)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64, **(model_kw or {})))
    module = CausalLMModule(model, OptimizerSpec(**spec))
    windows, _ = _windows(steps, seed)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(root, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(windows, batch_size=BATCH))
    return trainer, module


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _metrics(trainer: Any) -> Any:
    import pandas as pd

    return pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")


def wallclock_figure(out: Path, steps: int, root: str) -> Path:
    import matplotlib.pyplot as plt

    from lightning_optlab.callbacks.wallclock import WallClock

    runs = [
        ("adamw", dict(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
        ("lion", dict(name="lion", lr=3e-4, betas=(0.9, 0.99), weight_decay=1.0)),
        ("adafactor", dict(name="adafactor", lr=3e-3)),
        ("sophia", dict(name="sophia", lr=1e-3)),
        ("shampoo", dict(name="shampoo", lr=3e-3)),
        ("soap", dict(name="soap", lr=3e-3)),
        ("muon+adamw", dict(name="muon", lr=0.02, mix=[dict(optimizer="adamw", lr=3e-3,
                                                            roles=["embedding", "readout", "norm", "bias"])])),
    ]
    parts = [("data", "data wait"), ("fwd_bwd", "forward + backward"), ("optimizer", "optimizer step"),
             ("refresh", "preconditioner refresh"), ("other", "other")]
    colors = ["#bbbbbb", "#4c72b0", "#dd8452", "#c44e52", "#8c8c8c"]
    rows = []
    for label, spec in runs:
        clock = WallClock(verbose=False)
        _fit(spec, steps, [clock], root=root)
        s = clock.summary
        per = {k: 1e3 * s[f"{k}_seconds"] / max(1, s["steps"]) for k, _ in parts}
        per["optimizer"] -= per["refresh"]  # the refresh is inside the optimizer step
        rows.append((label, per, s["tokens_per_sec"], s["optimizer_share"]))
        print(f"  wallclock {label:<11} {sum(per.values()):6.1f} ms/step, optimizer share {100 * s['optimizer_share']:.0f}%")
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
    for i, (label, per, tps, share) in enumerate(rows):
        left = 0.0
        for (k, name), color in zip(parts, colors):
            ax.barh(i, per[k], left=left, color=color, label=name if i == 0 else None)
            left += per[k]
        ax.text(left * 1.01, i, f"{tps:,.0f} tok/s, optimizer {100 * share:.0f}%", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(sum(r[1].values()) for r in rows) * 1.85)
    ax.set_xlabel("milliseconds per optimizer step (mean)")
    ax.set_title(f"WallClock: where the step time goes (demo GPT, CPU, 1 thread, {steps} steps)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out / "callback_wallclock.png")


def stability_figure(out: Path, steps: int, root: str) -> Path:
    import matplotlib.pyplot as plt

    from lightning_optlab.callbacks.stability import StabilityMonitor

    spec = dict(name="adamw", lr=3e-2, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=10, schedule="constant")
    variants = [("no QK-LayerNorm, no z-loss", {}), ("QK-LayerNorm + z-loss 1e-4", dict(qk_layernorm=True, z_loss=1e-4))]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (label, kw), style in zip(variants, ["-", "--"]):
        trainer, _ = _fit(spec, steps, [StabilityMonitor(every_n_steps=5)], model_kw=kw, root=root)
        m = _metrics(trainer)
        layers = sorted(c for c in m.columns if c.startswith("stability/attn_max_logit/"))
        for j, col in enumerate(layers):
            d = m[["step", col]].dropna()
            axes[0].plot(d["step"], d[col], style, color=f"C{j}", label=f"{col.rsplit('/', 1)[-1]}, {label}")
        for ax, col in ((axes[1], "stability/log_z_mean"), (axes[2], "train/loss")):
            if col in m:
                d = m[["step", col]].dropna()
                ax.plot(d["step"], d[col], style, color="k", label=label)
    axes[0].set(title="max attention logit per layer", xlabel="step", yscale="log")
    axes[1].set(title="output log-partition log Z (z-loss pulls it to 0)", xlabel="step")
    axes[2].set(title="training loss", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=8)
    fig.suptitle("StabilityMonitor: AdamW at lr 3e-2 on the demo GPT, without and with the cures of Wortsman et al. 2023")
    return _save(fig, out / "callback_stability.png")


def nonfinite_figure(out: Path, steps: int, root: str) -> Path:
    import matplotlib.pyplot as plt
    from lightning.pytorch.callbacks import Callback

    from lightning_optlab.callbacks.nonfinite import NonFiniteGuard

    bad_steps = {steps // 4, steps // 2, steps // 2 + 1, 3 * steps // 4}

    class NaNGradients(Callback):
        def __init__(self) -> None:
            self.losses: list[tuple[int, float]] = []  # NaN included (a CSV reader would drop it)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.losses.append((trainer.global_step - 1, float(outputs["loss"])))

        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step in bad_steps:
                # a weight every token goes through (an unused embedding row would hide the NaN)
                dict(pl_module.named_parameters())["model.blocks.0.attn.q_proj.weight"].grad.view(-1)[0] = math.nan

    spec = dict(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    fig, ax = plt.subplots(figsize=(9, 4))
    runs = (('NonFiniteGuard(action="skip")', [NonFiniteGuard("skip")], "C0", "-"), ("no guard", [], "C3", "--"))
    for label, guard, color, style in runs:
        inject = NaNGradients()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(spec, steps, [inject, *guard], root=root)
        finite = [(s, v) for s, v in inject.losses if math.isfinite(v)]
        ax.plot(*zip(*finite), style, color=color, label=label)
        if len(finite) < len(inject.losses):
            last = next(s for s, v in inject.losses if not math.isfinite(v))
            ax.plot(finite[-1][0], finite[-1][1], "x", color=color, ms=12, mew=2.5)
            ax.annotate(f"no guard: loss is NaN from step {last} on", finite[-1], textcoords="offset points",
                        xytext=(10, 40), color=color, arrowprops=dict(arrowstyle="->", color=color))
    for s in sorted(bad_steps):
        ax.axvline(s, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel="optimizer step", ylabel="training loss",
           title="NonFiniteGuard: NaN gradients arrive at the dotted steps")
    ax.legend()
    return _save(fig, out / "callback_nonfinite.png")


def schedule_free_figure(out: Path, steps: int, root: str) -> Path:
    import matplotlib.pyplot as plt
    from lightning.pytorch.callbacks import Callback
    from torch.nn import functional as F

    from lightning_optlab.callbacks.schedule_free import schedule_free_optimizers

    _, held = _windows(1)

    class Probe(Callback):
        """Held-out loss at the training weights y and at the evaluation weights x, every 10 steps."""

        def __init__(self) -> None:
            self.rows: list[tuple[int, float, float]] = []

        @torch.no_grad()
        def _loss(self, pl_module: Any) -> float:
            was = pl_module.training
            pl_module.eval()
            logits = pl_module(held[:, :-1])
            pl_module.train(was)
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step % 10:
                return
            opts = list(schedule_free_optimizers(trainer.optimizers))
            y = self._loss(pl_module)
            for o in opts:
                o.eval()
            x = self._loss(pl_module)
            for o in opts:
                o.train()
            self.rows.append((trainer.global_step, y, x))

    probe = Probe()
    _fit(dict(name="schedule_free_adamw", lr=1e-2, betas=(0.9, 0.95), warmup_steps=20), steps, [probe], root=root)
    s, y, x = zip(*probe.rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(s, y, color="C3", label="training weights y (what you evaluate without the switch)")
    ax.plot(s, x, color="C0", label="evaluation weights x (what ScheduleFreeModeSwitch evaluates and saves)")
    ax.set(xlabel="optimizer step", ylabel="held-out loss", title="ScheduleFreeModeSwitch: Schedule-Free AdamW (lr 1e-2) on the demo GPT")
    ax.legend()
    return _save(fig, out / "callback_schedule_free.png")


FIGURES = {"wallclock": wallclock_figure, "stability": stability_figure, "nonfinite": nonfinite_figure,
           "schedule_free": schedule_free_figure}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img", help="folder for the PNGs (default docs/img)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(FIGURES)}")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [n for n in args.only.split(",") if n] or list(FIGURES)
    unknown = [n for n in chosen if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose among {', '.join(FIGURES)}")
    with tempfile.TemporaryDirectory() as root:
        for name in chosen:
            print(f"{name}: {FIGURES[name](out, args.steps, root)}")


if __name__ == "__main__":
    main()
