"""The end-to-end demo: a small GPT trained on an embedded corpus with several optimizers.

The corpus is the English reference documentation that ships inside CPython
(``pydoc_data.topics``: ~80 documents, ~460k characters of natural-language text), so nothing
is downloaded. Text is tokenized as UTF-8 bytes. Every optimizer trains the same model from the
same initialization on the same batches with a cosine schedule; the report compares final
validation loss (in bits per byte) and wall-clock, and plots the loss curves.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DemoConfig", "DEFAULT_RUNS", "embedded_corpus", "run_demo"]

#: (label, OptimizerSpec keyword arguments): learning rates picked for this tiny model
DEFAULT_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("adamw", dict(name="adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("sgd", dict(name="sgd", lr=0.1, betas=(0.98, 0.0), weight_decay=0.0)),
    ("adafactor", dict(name="adafactor", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("lion", dict(name="lion", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.3)),
    ("signum", dict(name="signum", lr=1e-3, betas=(0.95, 0.0), weight_decay=0.3)),
    ("adalayer", dict(name="adalayer", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)),
    ("sgd+adalayer(readout+norm)", dict(name="sgd", lr=0.1, betas=(0.98, 0.0),
                                        mix=[dict(optimizer="adalayer", roles=["readout", "norm"], lr=3e-3, betas=(0.9, 0.95))])),
    ("sophia", dict(name="sophia", lr=1e-3, betas=(0.965, 0.99), weight_decay=0.1)),
    ("adam_mini", dict(name="adam_mini", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, hparams={"n_heads": 4})),
    ("schedule_free_adamw", dict(name="schedule_free_adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, schedule="constant")),
]


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    #: optimizer steps per run
    steps: int = 300
    #: sequences per batch
    batch_size: int = 16
    #: tokens per sequence
    seq_len: int = 64
    #: model width / depth / heads
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    #: warmup steps of the cosine schedule
    warmup_steps: int = 20
    #: labels of DEFAULT_RUNS to run (all when empty)
    optimizers: list[str] = field(default_factory=list)
    #: output folder for the report, plot and logs
    out_dir: str = "optlab_runs/demo"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        known = [label for label, _ in DEFAULT_RUNS]
        unknown = [o for o in self.optimizers if o not in known]
        if unknown:
            raise ValueError(f"unknown demo run(s) {unknown}; choose from: {', '.join(known)}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")


def embedded_corpus() -> list[tuple[str, str]]:
    """``(title, text)`` documents of CPython's bundled reference documentation."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _split(docs: list[tuple[str, str]], val_fraction: float = 0.1) -> tuple[bytes, bytes]:
    train, val = [], []
    for title, text in docs:
        h = int(hashlib.sha1(title.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train).append(text.encode("utf-8") + b"\n\n")
    return b"".join(train), b"".join(val)


class _Windows(Dataset):
    """Fixed windows of ``seq_len + 1`` byte tokens, drawn at seeded random offsets."""

    def __init__(self, data: bytes, seq_len: int, n: int, seed: int) -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(self.data) - seq_len - 1, (n,), generator=g)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return self.data[s : s + self.seq_len + 1]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train every selected optimizer, write ``report.md``, ``report.json`` and ``loss_curves.png``."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from .configure import OptimizerSpec
    from .lit import CausalLMModule
    from .models import GPT, GPTConfig

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_bytes, val_bytes = _split(embedded_corpus())
    train_ds = _Windows(train_bytes, cfg.seq_len, cfg.steps * cfg.batch_size, cfg.seed)
    val_ds = _Windows(val_bytes, cfg.seq_len, 8 * cfg.batch_size, cfg.seed + 1)
    print(f"corpus: {len(train_bytes):,} train bytes, {len(val_bytes):,} validation bytes (CPython's pydoc topics)")

    class Recorder(Callback):
        def __init__(self) -> None:
            self.train: list[float] = []
            self.val: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            self.train.append(float(outputs["loss"]))

        def on_validation_epoch_end(self, trainer, pl_module):  # noqa: ANN001
            if not trainer.sanity_checking:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    runs = [(lab, kw) for lab, kw in DEFAULT_RUNS if not cfg.optimizers or lab in cfg.optimizers]
    results: dict[str, Any] = {}
    for label, kwargs in runs:
        kwargs = {"schedule": "cosine", "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps,
                  "min_lr_ratio": 0.1, **kwargs}
        if kwargs["schedule"] == "constant":
            kwargs.pop("total_steps"), kwargs.pop("min_lr_ratio")
        spec = OptimizerSpec(**kwargs)
        L.seed_everything(cfg.seed, verbose=False)
        model = GPT(GPTConfig(vocab_size=256, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd))
        module = CausalLMModule(model, spec)
        rec = Recorder()
        trainer = L.Trainer(
            max_steps=cfg.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, callbacks=[rec], val_check_interval=max(1, cfg.steps // 4),
            check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=True,
        )
        print(f"\n=== {label} ===")
        t0 = time.perf_counter()
        trainer.fit(module, DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=False),
                    DataLoader(val_ds, batch_size=cfg.batch_size))
        seconds = time.perf_counter() - t0
        final = rec.val[-1][1] if rec.val else float("nan")
        results[label] = {
            "spec": spec.to_dict(), "final_val_loss": final, "final_val_bpb": final / math.log(2),
            "seconds": seconds, "train_loss": rec.train, "val_loss": rec.val,
        }
    _write_report(cfg, results, out)
    return results


def _write_report(cfg: DemoConfig, results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in results.items():
        ax1.plot(r["train_loss"], label=label, lw=1)
        if r["val_loss"]:
            ax2.plot(*zip(*r["val_loss"]), marker="o", label=label)
    ax1.set(xlabel="optimizer step", ylabel="train loss (nats/byte)", title="training loss")
    ax2.set(xlabel="optimizer step", ylabel="validation loss (nats/byte)", title="validation loss")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    def final(kv: tuple[str, Any]) -> float:
        loss = kv[1]["final_val_loss"]
        return loss if math.isfinite(loss) else math.inf  # diverged runs rank last

    ranked = sorted(results.items(), key=final)
    best = final(ranked[0])
    lines = [
        "# lightning_optlab demo report",
        "",
        f"GPT-2-style model, {cfg.n_layer} layers x {cfg.n_embd} wide, byte-level, {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens on CPython's bundled documentation; cosine schedule "
        f"({cfg.warmup_steps} warmup steps), same initialization and batches for every optimizer.",
        "",
        "| optimizer | lr | final val loss | bits/byte | vs best | wall-clock (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in ranked:
        if not math.isfinite(r["final_val_loss"]):
            lines.append(f"| {label} | {r['spec']['lr']:g} | diverged | - | - | {r['seconds']:.1f} |")
            continue
        lines.append(
            f"| {label} | {r['spec']['lr']:g} | {r['final_val_loss']:.4f} | {r['final_val_bpb']:.3f} | "
            f"{r['final_val_loss'] - best:+.4f} | {r['seconds']:.1f} |"
        )
    lines += ["", "![loss curves](loss_curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n" + "\n".join(lines[:-3]))
    print(f"\nreport: {out / 'report.md'}   plot: {out / 'loss_curves.png'}")
