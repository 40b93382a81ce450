"""The end-to-end demo: a tiny LLaMA-style model trained on an embedded corpus with several optimizers.

The corpus is the English reference documentation that ships inside CPython
(``pydoc_data.topics``: ~80 documents, ~460k characters), so nothing is downloaded. It is
written out as SlimPajama-format shards (``.jsonl.zst``) and read back through the same
reader, tokenizer (a byte-level BPE trained on it) and packing that real SlimPajama uses.
Every optimizer trains the same model from the same initialization on the same token stream;
the report compares final validation loss, tokens/s and the optimizer's share of step time,
plots validation loss against steps and against wall-clock, and ends with zero-shot accuracy on
the sample ARC-Easy, ARC-Challenge, HellaSwag and MMLU files shipped with the package (scored
through lm-eval by :class:`lightning_optlab.eval.ModuleLM`; a handful of questions each, so the
numbers show the pipeline working, not a ranking — a model this small answers near chance).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.corpus import embedded_corpus
from .optim.registry import available_optimizers

__all__ = ["DemoConfig", "DEFAULT_RUNS", "embedded_corpus", "run_demo"]

# (label, OptimizerSpec keyword arguments); learning rates from a coarse sweep (3x apart) on this
# tiny model at 300 steps (final val loss, e.g. Lion 3e-4 / 1e-3 / 3e-3 / 1e-2: 5.36 / 5.58 / 4.50 /
# 5.66; Sophia 3e-4 / 1e-3 / 3e-3 / 1e-2: 5.33 / 5.40 / 5.43 / 5.90: the sign-like runs can stay on
# the unigram plateau at this length, so their curves are bumpy). Runs whose optimizer is not
# registered in this installation are left out.
DEFAULT_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("adamw", dict(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("lion", dict(name="lion", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    ("signum", dict(name="signum", lr=1e-3, betas=(0.95, 0.0), weight_decay=0.3)),
    ("adafactor", dict(name="adafactor", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("adalayer", dict(name="adalayer", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("sgd+adalayer(readout+norm)", dict(name="sgd", lr=0.3, hparams={"momentum": 0.98},
                                        mix=[dict(optimizer="adalayer", roles=["readout", "norm"], lr=3e-3)])),
    ("sophia", dict(name="sophia", lr=3e-4, betas=(0.965, 0.99), weight_decay=0.1)),
    ("adam_mini", dict(name="adam_mini", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, hparams={"n_heads": 4})),
    ("soap", dict(name="soap", lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01)),
    ("shampoo", dict(name="shampoo", lr=3e-3, weight_decay=0.0)),
    ("muon+adamw", dict(name="muon", lr=0.02, mix=[dict(optimizer="adamw", roles=["embedding", "readout", "norm"],
                                                       lr=3e-3, betas=(0.9, 0.95))])),
    ("schedule_free_adamw", dict(name="schedule_free_adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                 schedule="constant")),
]


def available_runs() -> list[str]:
    """Labels of the default runs whose optimizers (and mixed-in optimizers) are registered."""
    known = set(available_optimizers())
    out = []
    for label, kw in DEFAULT_RUNS:
        names = {kw["name"], *(part["optimizer"] for part in kw.get("mix", []))}
        if names <= known:
            out.append(label)
    return out


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    #: optimizer steps per run
    steps: int = 300
    #: sequences per batch
    batch_size: int = 8
    #: tokens per sequence
    seq_len: int = 128
    #: model preset (see lightning_optlab.models.available_presets())
    preset: str = "llama-tiny"
    #: BPE vocabulary size trained on the corpus
    vocab_size: int = 1024
    #: warmup steps of the cosine schedule
    warmup_steps: int = 20
    #: validate every this many steps
    val_every: int = 25
    #: labels of DEFAULT_RUNS to run (default: adamw, lion, signum, adalayer, soap / sophia ...)
    optimizers: list[str] = field(default_factory=list)
    #: output folder for the report, plots, TensorBoard logs and the data shards
    out_dir: str = "optlab_runs/demo"
    seed: int = 0
    #: end with zero-shot accuracy on the shipped ARC/HellaSwag/MMLU samples (through lm-eval)
    zeroshot: bool = True
    #: torch CPU threads (1 by default: at this model size a second thread gains little and, with
    #: any other load on a 2-core machine, oversubscription makes steps several times slower)
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "vocab_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        known = available_runs()
        unknown = [o for o in self.optimizers if o not in known]
        if unknown:
            raise ValueError(f"unknown demo run(s) {unknown}; choose from: {', '.join(known)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        from .models import available_presets

        if self.preset not in available_presets():
            raise ValueError(f"unknown preset {self.preset!r}; choose from: {', '.join(available_presets())}")


def _default_selection() -> list[str]:
    wanted = ["adamw", "lion", "signum", "adalayer", "sgd+adalayer(readout+norm)", "sophia", "soap", "muon+adamw"]
    known = available_runs()
    return [w for w in wanted if w in known]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train every selected optimizer; write ``report.md``, ``report.json`` and ``loss_curves.png``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks.health import PreconditionerHealth
    from .callbacks.nonfinite import NonFiniteGuard
    from .callbacks.stability import StabilityMonitor
    from .callbacks.wallclock import WallClock
    from .configure import OptimizerSpec
    from .data.corpus import write_embedded_shards
    from .lit import CausalLMModule, LMDataModule

    import torch

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_embedded_shards(out / "slimpajama_format")
    print(f"embedded corpus (CPython's reference docs) written as {len(shards)} SlimPajama-format shards "
          f"in {shards[0].parent}")

    def datamodule() -> LMDataModule:
        return LMDataModule(data=str(out / "slimpajama_format"), tokenizer="bpe", vocab_size=cfg.vocab_size,
                            seq_len=cfg.seq_len, batch_size=cfg.batch_size, val_batches=4, seed=cfg.seed,
                            work_dir=str(out / "data_cache"))

    class Curves(Callback):
        """Validation loss against step and against training wall-clock (from WallClock)."""

        def __init__(self, clock: WallClock) -> None:
            self.clock = clock
            self.val: list[tuple[int, float, float]] = []

        def on_validation_epoch_end(self, trainer, pl_module):  # noqa: ANN001
            fitting = trainer.state.fn == "fit"  # not the final trainer.validate
            if fitting and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                self.val.append((trainer.global_step, self.clock.summary["train_seconds"],
                                 float(trainer.callback_metrics["val/loss"])))

    zeroshot = None
    zeroshot_note = None
    if cfg.zeroshot:
        try:
            zeroshot = _ZeroShot(out / "zeroshot_tasks")
        except ImportError as err:  # lm-eval is the optional `eval` extra
            from ._extras import missing_extra

            zeroshot_note = f"zero-shot table skipped: {missing_extra(err) or err}"
            print(zeroshot_note)
    labels = cfg.optimizers or _default_selection()
    runs = [(lab, kw) for lab, kw in DEFAULT_RUNS if lab in labels]
    results: dict[str, Any] = {}
    for i, (label, kwargs) in enumerate(runs):
        kwargs = {"schedule": "cosine", "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps,
                  "min_lr_ratio": 0.1, **kwargs}
        if kwargs["schedule"] == "constant":
            kwargs.pop("total_steps"), kwargs.pop("min_lr_ratio")
        spec = OptimizerSpec(**kwargs)
        L.seed_everything(cfg.seed, verbose=False)
        module = CausalLMModule({"preset": cfg.preset, "block_size": cfg.seq_len}, spec)
        clock = WallClock(verbose=False)
        curves = Curves(clock)
        slug = label.replace("+", "_").replace("(", "_").replace(")", "")
        health = PreconditionerHealth(every_n_steps=max(1, cfg.steps // 6),
                                      plot_path=out / "health" / f"{slug}.png")
        watch = [clock, curves, health, StabilityMonitor(every_n_steps=max(1, cfg.steps // 6)), NonFiniteGuard()]
        trainer = L.Trainer(
            max_steps=cfg.steps, accelerator="cpu", devices=1, enable_checkpointing=False,
            logger=TensorBoardLogger(out / "tensorboard", name=label.replace("+", "_"), version=""),
            enable_model_summary=False, callbacks=watch, val_check_interval=cfg.val_every,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=True,
            log_every_n_steps=10,
        )
        print(f"\n=== [{i + 1}/{len(runs)}] {label} ===")
        dm = datamodule()
        trainer.fit(module, datamodule=dm)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        s = clock.summary
        results[label] = {
            "spec": spec.to_dict(), "final_val_loss": metrics["val/loss"], "final_val_ppl": metrics["val/ppl"],
            "tokens_per_sec": s["tokens_per_sec"], "optimizer_share": s["optimizer_share"],
            "optimizer_ms_per_step": 1e3 * s["optimizer_seconds"] / max(1, s["steps"]),
            "train_seconds": s["train_seconds"], "steps": s["steps"], "tokens": s["tokens"],
            "val_curve": curves.val, "params": sum(p.numel() for p in module.parameters()),
            "health_plot": str(health.written_plot) if health.written_plot else None,
        }
        if zeroshot is not None:  # the module holds Schedule-Free's x here (the switch ran at train end)
            results[label]["zeroshot"] = zeroshot(module, dm.tokenizer)
    _write_report(cfg, results, out, zeroshot_note=zeroshot_note)
    return results


class _ZeroShot:
    """Zero-shot accuracy on the shipped sample tasks; the tasks are prepared and loaded once."""

    def __init__(self, task_dir: Path) -> None:
        from ._extras import require

        require("lm_eval")  # the optional `eval` extra: the caller skips the table without it
        from .eval import SAMPLE_TASKS, TaskSet, prepare_samples

        prepare_samples(task_dir)
        self.suite = TaskSet(SAMPLE_TASKS, task_dir=task_dir)

    def __call__(self, module: Any, tokenizer: Any) -> dict[str, float]:
        from .eval import ModuleLM, metrics_from_results, run_tasks

        results = run_tasks(ModuleLM(module, tokenizer, batch_size=32), self.suite)
        return metrics_from_results(results, self.suite.names)


def _zeroshot_lines(results: dict[str, Any], note: str | None = None) -> list[str]:
    rows = {label: r["zeroshot"] for label, r in results.items() if r.get("zeroshot")}
    if not rows:
        return ["", "## Zero-shot accuracy on the sample tasks", "", note] if note else []
    from .eval import SAMPLE_TASKS, format_table

    return ["", "## Zero-shot accuracy on the sample tasks", "",
            "lm-eval (zero-shot, the built-in prompts and metrics) on the tiny ARC-Easy/ARC-Challenge/HellaSwag/"
            "MMLU sample files shipped with the package (6-11 questions each): a check that the evaluation "
            "runs on the trained models, not a benchmark result.", "", format_table(rows, SAMPLE_TASKS)]


def _write_report(cfg: DemoConfig, results: dict[str, Any], out: Path, zeroshot_note: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for label, r in results.items():
        if r["val_curve"]:
            steps, secs, losses = zip(*r["val_curve"])
            ax1.plot(steps, losses, marker="o", ms=3, label=label)
            ax2.plot(secs, losses, marker="o", ms=3, label=label)
    ax1.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation loss vs steps")
    ax2.set(xlabel="training wall-clock (s, validation excluded)", title="validation loss vs wall-clock")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{cfg.preset} on CPython's docs (SlimPajama-format shards), {cfg.steps} steps of "
                 f"{cfg.batch_size}x{cfg.seq_len} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    def final(kv: tuple[str, Any]) -> float:
        loss = kv[1]["final_val_loss"]
        return loss if math.isfinite(loss) else math.inf  # diverged runs rank last

    ranked = sorted(results.items(), key=final)
    best = final(ranked[0]) if ranked else math.nan
    n_params = next(iter(results.values()))["params"] if results else 0
    lines = [
        "# lightning_optlab demo report",
        "",
        f"LLaMA-style `{cfg.preset}` ({n_params:,} parameters), byte-level BPE ({cfg.vocab_size} tokens), "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens on CPython's reference documentation "
        f"read as SlimPajama-format shards; cosine schedule ({cfg.warmup_steps} warmup steps); the same "
        "initialization and token stream for every optimizer. CPU timings.",
        "",
        "| optimizer | lr | final val loss | val ppl | vs best | tokens/s | optimizer ms/step | optimizer share | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in ranked:
        if not math.isfinite(r["final_val_loss"]):
            lines.append(f"| {label} | {r['spec']['lr']:g} | diverged | - | - | {r['tokens_per_sec']:,.0f} | "
                         f"{r['optimizer_ms_per_step']:.2f} | {100 * r['optimizer_share']:.1f} % | {r['train_seconds']:.1f} |")
            continue
        lines.append(
            f"| {label} | {r['spec']['lr']:g} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.1f} | "
            f"{r['final_val_loss'] - best:+.4f} | {r['tokens_per_sec']:,.0f} | {r['optimizer_ms_per_step']:.2f} | "
            f"{100 * r['optimizer_share']:.1f} % | {r['train_seconds']:.1f} |"
        )
    table_end = len(lines)
    lines += _zeroshot_lines(results, zeroshot_note)
    lines += ["", "![validation loss](loss_curves.png)", ""]
    plots = [(label, r["health_plot"]) for label, r in ranked if r.get("health_plot")]
    if plots:
        lines += ["Effective learning rates per layer over training (PreconditionerHealth):", ""]
        lines += [f"- {label}: [{Path(path).relative_to(out)}]({Path(path).relative_to(out)})" for label, path in plots]
        lines += [""]
    lines += ["Every run also logs the optimizer's health statistics, attention-logit and output-logit "
              "statistics (StabilityMonitor) and the step-time split (WallClock) to TensorBoard, under a "
              "NonFiniteGuard.", "", f"TensorBoard: `tensorboard --logdir {out / 'tensorboard'}`", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n" + "\n".join(lines[:table_end]))
    zeroshot = _zeroshot_lines(results, zeroshot_note)
    if zeroshot:
        print("\n".join(zeroshot))
    print(f"\nreport: {out / 'report.md'}   plot: {out / 'loss_curves.png'}   "
          f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
