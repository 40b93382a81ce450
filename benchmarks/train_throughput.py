"""Tokens/s of the reference model through Lightning vs a plain PyTorch loop doing the same steps.

Both loops train the same preset from the same initialization with the same optimizer
(configured by ``lightning_optlab.configure``) on the same in-memory batches; they run in
interleaved rounds so that machine noise hits both alike. The ratio of Lightning's step time to
the plain loop's is Lightning's overhead (bar: ≤ 1.05).

    python benchmarks/train_throughput.py                        # CPU, llama-tiny
    python benchmarks/train_throughput.py --device cuda --preset gpt2-124m --batch 16 --seq 1024 \
        --precision bf16-mixed --compile                         # GPU: also prints MFU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lightning_optlab import OptimizerSpec, configure
from lightning_optlab.models import build_model

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device) for _ in range(args.steps)]


def plain_loop(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step of a hand-written loop: forward, loss, backward, step, scheduler, zero_grad."""
    torch.manual_seed(0)
    model = build_model(args.preset, block_size=args.seq).to(device)
    fwd = torch.compile(model, backend=getattr(args, "compile_backend", "inductor")) if args.compile else model
    out = configure(model, OptimizerSpec(name=args.optimizer, lr=1e-3))
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    batches = _batches(args, model.config.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    times = []
    for i, batch in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = model.loss(fwd(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lightning_loop(args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step through ``Trainer.fit`` with ``CausalLMModule`` (median over steps)."""
    import lightning as L

    from lightning_optlab.lit import CausalLMModule

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            _sync(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            _sync(device)
            if batch_idx >= args.warmup:
                self.times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    model = build_model(args.preset, block_size=args.seq)
    if args.compile:
        model = torch.compile(model, backend=getattr(args, "compile_backend", "inductor"))
    module = CausalLMModule(model, OptimizerSpec(name=args.optimizer, lr=1e-3))
    timer = StepTimer()
    batches = [b.cpu() for b in _batches(args, build_model(args.preset, block_size=8).config.vocab_size, torch.device("cpu"))]
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision=args.precision, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return statistics.median(timer.times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="llama-tiny")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    plain, light = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(args, device))
        light.append(lightning_loop(args, device))
    tokens = args.batch * args.seq
    t_plain, t_light = statistics.median(plain), statistics.median(light)
    print(f"device={device} preset={args.preset} optimizer={args.optimizer} batch={args.batch}x{args.seq} "
          f"precision={args.precision} compile={args.compile} torch={torch.__version__}")
    print(f"{'loop':<12}{'ms/step':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'plain':<12}{t_plain * 1e3:>10.2f}{tokens / t_plain:>12,.0f}{1.0:>8.3f}")
    print(f"{'lightning':<12}{t_light * 1e3:>10.2f}{tokens / t_light:>12,.0f}{t_light / t_plain:>8.3f}   (bar ≤ 1.05)")
    if device.type == "cuda":
        model = build_model(args.preset, block_size=args.seq)
        fpt = model.flops_per_token()
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak and args.precision == "bf16-mixed":
            print(f"MFU (plain loop, {name}, bf16 peak {peak / 1e12:.0f} TFLOP/s): {fpt * tokens / t_plain / peak:.1%}; "
                  f"Lightning: {fpt * tokens / t_light / peak:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
