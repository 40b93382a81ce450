"""The accelerator numbers in one prepared run: optimizer steps, speed options, MFU, time to a loss.

One table, four sections, every time a ratio to a baseline measured in the same run:

* ``step``: ``step()`` of every registered optimizer on GPT-2-small's parameter set (163M with an
  untied 50304-token readout; the vocabulary side stays unpreconditioned, above SOAP's and
  Shampoo's ``max_precond_dim``, as the reference does), against torch's fused AdamW. Each step is
  timed with CUDA events; the median step and the step amortized over ``--rounds`` rounds of
  ``precondition_frequency`` steps (so ≥ 3 refreshes), optimizer-state bytes per parameter, and
  the first step's seconds apart (state allocation, and compilation for the ``compiled`` rows).
* ``options``: SOAP, Shampoo and Muon with each speed option (CholeskyQR2 refresh, spread
  refresh, unstacked rotations, TF32 matrix products, Newton roots, Newton-Schulz precision): the
  step on the same parameter set, and the held-out loss of a short run of a small byte-level
  LLaMA with the option against the default (the same batches and initialization).
* ``mfu``: the reference GPT-2-124M in bf16 autocast, eager and ``torch.compile``d, through
  Lightning and through a plain loop (``benchmarks/train_throughput.py``'s two loops); MFU is
  ``flops_per_token · tokens/s`` over Lightning's ``get_available_flops`` for the device.
* ``to_loss``: SOAP against AdamW on a ~57M LLaMA (8 × 768, bytes) at 4k tokens per step: the
  steps and the seconds SOAP needs to reach AdamW's final training loss.

``--dry-run`` runs the same code on the CPU at tiny sizes (compilation with the ``eager``
backend), so the suite is exercised by the test suite and cannot rot. Sections stop starting new
rows once ``--budget-s`` is spent, and say so.

    python benchmarks/gpu_suite.py --json gpu_suite.json      # on one GPU, < 8 minutes
    python benchmarks/gpu_suite.py --dry-run                  # CPU smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import optim_step  # noqa: E402  (benchmarks/optim_step.py: ParamSet, ROWS, state bytes)
import train_throughput  # noqa: E402  (benchmarks/train_throughput.py: the two training loops)

from lightning_optlab import OptimizerSpec, build_optimizer, configure  # noqa: E402
from lightning_optlab.models import build_model  # noqa: E402
from lightning_optlab.mup.experiment import eval_loss, fixed_batches  # noqa: E402
from lightning_optlab.optim import available_optimizers  # noqa: E402

#: sizes of a real run and of the CPU dry run
SIZES = {
    "full": dict(width=768, layers=12, heads=12, vocab=50304, rounds=3, freq=10,
                 opt_model=dict(family="llama", n_layer=4, n_embd=256, n_head=4, vocab_size=256, block_size=256),
                 opt_steps=200, opt_batch=16, opt_seq=256,
                 mfu_preset="gpt2-124m", mfu_batch=16, mfu_seq=1024, mfu_steps=30,
                 loss_model=dict(family="llama", n_layer=8, n_embd=768, n_head=12, vocab_size=256, block_size=512),
                 loss_steps=400, loss_batch=8, loss_seq=512),
    "dry": dict(width=32, layers=1, heads=4, vocab=128, rounds=3, freq=2,
                opt_model=dict(family="llama", n_layer=1, n_embd=32, n_head=4, vocab_size=256, block_size=32),
                opt_steps=6, opt_batch=2, opt_seq=16,
                mfu_preset="gpt2-tiny", mfu_batch=2, mfu_seq=32, mfu_steps=4,
                loss_model=dict(family="llama", n_layer=1, n_embd=32, n_head=4, vocab_size=256, block_size=32),
                loss_steps=12, loss_batch=2, loss_seq=16),
}

#: speed options of the matrix methods: row name -> (optimizer, constructor arguments, context)
OPTIONS: dict[str, tuple[str, dict, str]] = {
    "soap (default: qr, fp32)": ("soap", {}, ""),
    "soap cholesky_qr": ("soap", {"refresh": "cholesky_qr"}, ""),
    "soap spread_refresh": ("soap", {"spread_refresh": True}, ""),
    "soap unstacked": ("soap", {}, "unstacked"),
    "soap tf32": ("soap", {}, "tf32"),
    "soap all options": ("soap", {"refresh": "cholesky_qr", "spread_refresh": True}, "tf32"),
    "shampoo (default: eigh)": ("shampoo", {}, ""),
    "shampoo root=newton": ("shampoo", {"root": "newton"}, ""),
    "shampoo tf32": ("shampoo", {}, "tf32"),
    "muon ns bfloat16 (CUDA default)": ("muon", {"ns_dtype": "bfloat16"}, ""),
    "muon ns float32": ("muon", {"ns_dtype": "float32"}, ""),
    "muon ns float32 tf32": ("muon", {"ns_dtype": "float32"}, "tf32"),
}

#: the issue's goals (ratio to the row named on the right)
GOALS = {"soap": (10.0, "fused AdamW, amortized"), "muon vs torch": (1.0, "torch.optim.Muon"),
         "soap seconds to AdamW's loss": (0.6, "AdamW")}


@dataclasses.dataclass
class Row:
    section: str
    name: str
    median_ms: float = math.nan
    amortized_ms: float = math.nan
    ratio: float = math.nan
    bytes_per_param: float = math.nan
    first_s: float = math.nan
    loss: float = math.nan
    note: str = ""


class Timer:
    """Per-step times: CUDA events on a GPU (no host synchronization between steps), the host
    clock after a synchronization elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _context(kind: str, device: torch.device) -> Iterator[None]:
    """``tf32``: TF32 matrix products on CUDA (a no-op on the CPU); ``unstacked``: SOAP rotates
    same-shaped matrices one by one instead of as one bmm stack."""
    from lightning_optlab.optim import soap as soap_module

    tf32 = torch.backends.cuda.matmul.allow_tf32
    stack_max = getattr(soap_module, "_STACK_MAX_TOTAL", None)
    try:
        if kind == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        elif kind == "unstacked" and stack_max is not None:
            soap_module._STACK_MAX_TOTAL = 0
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if stack_max is not None:
            soap_module._STACK_MAX_TOTAL = stack_max


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = SIZES["dry" if args.dry_run else "full"]
        self.device = torch.device(args.device)
        self.rows: list[Row] = []
        self.t0 = time.perf_counter()
        torch.manual_seed(0)
        s = self.size
        self.params = optim_step.ParamSet(s["vocab"], s["width"], s["layers"]).to(self.device)
        self.n_params = sum(p.numel() for p in self.params.parameters())
        grads = optim_step._grads(self.params, self.device)
        for p, g in zip(self.params.parameters(), grads):
            p.grad = g
        self.initial = [p.detach().clone() for p in self.params.parameters()]
        self.adamw_ms: float = math.nan
        self.adamw_amortized_ms: float = math.nan

    # -- bookkeeping ---------------------------------------------------------------------------
    def over_budget(self, section: str, name: str) -> bool:
        if time.perf_counter() - self.t0 <= self.args.budget_s:
            return False
        self.rows.append(Row(section, name, note=f"not run: the {self.args.budget_s:.0f} s budget was spent"))
        return True

    def _restore(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params.parameters(), self.initial):
                p.copy_(p0)

    def _spec(self, name: str, hparams: dict | None = None) -> OptimizerSpec:
        row = dict(optim_step.ROWS[name])
        hp = dict(row.pop("hparams", {}))
        hp.pop("max_precond_dim", None)  # the optimizers' defaults: the vocabulary side stays unrotated
        if name in ("soap", "shampoo"):
            hp["precondition_frequency"] = self.size["freq"]
        if name == "adamw":
            hp["fused" if self.device.type == "cuda" else "foreach"] = True
        if name == "adam_mini":
            hp["n_heads"] = self.size["heads"]
        hp.update(hparams or {})
        return OptimizerSpec(**row, hparams=hp)

    def time_optimizer(self, opt: torch.optim.Optimizer, step: Callable[[], Any] | None = None) -> tuple[float, float, float]:
        """(first-step seconds, median step seconds, amortized step seconds) over rounds of
        ``freq`` steps; the parameters are restored afterwards."""
        step = step or opt.step
        _sync(self.device)
        t0 = time.perf_counter()
        step()
        _sync(self.device)
        first = time.perf_counter() - t0
        for _ in range(self.size["freq"] - 1):  # to the end of the first refresh period
            step()
        timer = Timer(self.device)
        timer.mark()
        for _ in range(self.size["rounds"] * self.size["freq"]):
            step()
            timer.mark()
        times = timer.seconds()
        self._restore()
        return first, statistics.median(times), sum(times) / len(times)

    # -- sections ------------------------------------------------------------------------------
    def step_section(self) -> None:
        names = ["adamw"] + [n for n in available_optimizers() if n != "adamw" and n in optim_step.ROWS]
        for name in names:
            if self.over_budget("step", name):
                continue
            opt = build_optimizer(self.params, self._spec(name))
            first, med, amort = self.time_optimizer(opt)
            if name == "adamw":
                self.adamw_ms, self.adamw_amortized_ms = med * 1e3, amort * 1e3
            note = ""
            if name in GOALS:
                goal, _ = GOALS[name]
                note = f"goal ≤ {goal:g}x amortized: {'met' if amort * 1e3 / self.adamw_amortized_ms <= goal else 'NOT met'}"
            self.rows.append(Row("step", name, med * 1e3, amort * 1e3, amort * 1e3 / self.adamw_amortized_ms,
                                 optim_step._state_bytes(opt) / self.n_params, first, note=note))
            del opt
        self._compiled_adamw()
        self._torch_muon()

    def _compiled_adamw(self) -> None:
        if self.over_budget("step", "adamw compiled"):
            return
        opt = torch.optim.AdamW(self.params.parameters(), lr=1e-3, weight_decay=0.1)
        backend = "eager" if self.args.dry_run else "inductor"
        compiled = torch.compile(opt.step, backend=backend)
        first, med, amort = self.time_optimizer(opt, compiled)
        self.rows.append(Row("step", f"adamw compiled ({backend})", med * 1e3, amort * 1e3,
                             amort * 1e3 / self.adamw_amortized_ms, optim_step._state_bytes(opt) / self.n_params,
                             first, note="first step includes compilation"))

    def _torch_muon(self) -> None:
        if not hasattr(torch.optim, "Muon") or self.over_budget("step", "torch.optim.Muon"):
            return
        hidden = [p for n, p in self.params.named_parameters() if n.startswith("blocks") and p.ndim == 2]
        ours = build_optimizer(self.params, self._spec("muon"))  # hidden matrices Muon, the rest AdamW
        rest = [p for n, p in self.params.named_parameters() if not (n.startswith("blocks") and p.ndim == 2)]
        peer = torch.optim.Muon(hidden, lr=0.02)
        peer_rest = torch.optim.AdamW(rest, lr=1e-3, fused=self.device.type == "cuda")

        def peer_step() -> None:
            peer.step()
            peer_rest.step()

        _, ours_med, ours_amort = self.time_optimizer(ours)
        first, med, amort = self.time_optimizer(peer, peer_step)
        ratio = ours_amort / amort
        goal = GOALS["muon vs torch"][0]
        self.rows.append(Row("step", "torch.optim.Muon + AdamW", med * 1e3, amort * 1e3,
                             amort * 1e3 / self.adamw_amortized_ms, math.nan, first,
                             note=f"ours / torch = {ratio:.2f} (goal ≤ {goal:g}: {'met' if ratio <= goal else 'NOT met'})"))

    def options_section(self) -> None:
        s = self.size
        model_cfg = s["opt_model"]
        batches = fixed_batches(s["opt_steps"], s["opt_batch"], s["opt_seq"], seed=0)
        held = fixed_batches(4, s["opt_batch"], s["opt_seq"], seed=1, offset=1)
        reference: dict[str, float] = {}
        for row_name, (name, hp, kind) in OPTIONS.items():
            if self.over_budget("options", row_name):
                continue
            with _context(kind, self.device):
                opt = build_optimizer(self.params, self._spec(name, hp))
                first, med, amort = self.time_optimizer(opt)
                del opt
                loss = self._short_run(name, hp, model_cfg, batches, held)
            reference.setdefault(name, loss)
            delta = loss - reference[name]
            self.rows.append(Row("options", row_name, med * 1e3, amort * 1e3, amort * 1e3 / self.adamw_amortized_ms,
                                 first_s=first, loss=loss, note=f"Δloss vs default {delta:+.4f}"))

    def _short_run(self, name: str, hp: dict, model_cfg: dict, batches: list, held: list) -> float:
        torch.manual_seed(0)
        model = build_model(dict(model_cfg)).to(self.device)
        spec = dataclasses.replace(self._spec(name, hp), schedule="cosine", warmup_steps=len(batches) // 10,
                                   total_steps=len(batches), min_lr_ratio=0.1)
        spec.hparams.pop("n_heads", None)
        made = configure(model, spec)
        opt, sched = made["optimizer"], made["lr_scheduler"]["scheduler"]
        for batch in batches:
            batch = batch.to(self.device)
            loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
            if not torch.isfinite(loss):
                return math.inf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return eval_loss(model, [b.to(self.device) for b in held])

    def mfu_section(self) -> None:
        s = self.size
        precision = "32-true" if self.args.dry_run else "bf16-mixed"
        flops = model_flops = None
        try:
            from lightning.fabric.utilities.throughput import get_available_flops

            flops = get_available_flops(self.device, torch.bfloat16 if precision == "bf16-mixed" else torch.float32)
        except Exception as err:  # noqa: BLE001 - an unknown device has no peak: the row says so
            print(f"no peak FLOP/s for {self.device}: {err}", file=sys.stderr)
        model_flops = build_model(s["mfu_preset"], block_size=s["mfu_seq"]).flops_per_token()
        tokens = s["mfu_batch"] * s["mfu_seq"]
        base = math.nan
        for compiled in (False, True):
            for loop_name, loop in (("plain loop", train_throughput.plain_loop),
                                    ("lightning", train_throughput.lightning_loop)):
                row_name = f"{s['mfu_preset']} {'compiled' if compiled else 'eager'} {loop_name}"
                if self.over_budget("mfu", row_name):
                    continue
                ns = argparse.Namespace(preset=s["mfu_preset"], optimizer="adamw", batch=s["mfu_batch"],
                                        seq=s["mfu_seq"], steps=s["mfu_steps"], warmup=min(3, s["mfu_steps"] - 1),
                                        precision=precision, compile=compiled,
                                        compile_backend="eager" if self.args.dry_run else "inductor")
                t0 = time.perf_counter()
                sec = loop(ns, self.device)
                total = time.perf_counter() - t0
                if math.isnan(base):
                    base = sec
                mfu = model_flops * tokens / sec / flops if flops else math.nan
                note = f"MFU {mfu:.1%}" if flops else "MFU: no peak known for this device"
                self.rows.append(Row("mfu", row_name, sec * 1e3, ratio=sec / base, first_s=total,
                                     note=f"{note}; {tokens / sec:,.0f} tokens/s; {precision}"))

    def to_loss_section(self) -> None:
        if self.over_budget("to_loss", "soap vs adamw"):
            return
        s = self.size
        batches = fixed_batches(s["loss_steps"], s["loss_batch"], s["loss_seq"], seed=0)
        runs = {}
        for name, lr, hp in (("adamw", 3e-3, {}), ("soap", 3e-3, {"precondition_frequency": 10})):
            torch.manual_seed(0)
            model = build_model(dict(s["loss_model"])).to(self.device)
            n = sum(p.numel() for p in model.parameters())
            spec = OptimizerSpec(name=name, lr=lr, betas=(0.95, 0.95), weight_decay=0.01, schedule="cosine",
                                 warmup_steps=len(batches) // 10, total_steps=len(batches), min_lr_ratio=0.1,
                                 hparams=hp)
            made = configure(model, spec)
            opt, sched = made["optimizer"], made["lr_scheduler"]["scheduler"]
            losses, clock = [], []
            _sync(self.device)
            t0 = time.perf_counter()
            for batch in batches:
                batch = batch.to(self.device)
                loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.detach())
                if len(losses) % 10 == 0 or len(losses) == len(batches):
                    _sync(self.device)
                    clock.append((len(losses), time.perf_counter() - t0))
            runs[name] = ([float(x) for x in losses], clock, n)
        k = max(1, len(batches) // 20)  # running mean: single steps are noisy
        smooth = {n: [statistics.mean(v[0][max(0, i - k + 1): i + 1]) for i in range(len(v[0]))] for n, v in runs.items()}
        target = smooth["adamw"][-1]
        hit = next((i + 1 for i, v in enumerate(smooth["soap"]) if v <= target), None)
        adamw_s = runs["adamw"][1][-1][1]
        tokens = s["loss_batch"] * s["loss_seq"]
        label = f"soap vs adamw, {runs['soap'][2] / 1e6:.1f}M params, {tokens} tokens/step"
        if hit is None:
            self.rows.append(Row("to_loss", label, loss=smooth["soap"][-1],
                                 note=f"SOAP did not reach AdamW's final loss {target:.4f} in {len(batches)} steps"))
            return
        soap_s = next(t for step, t in runs["soap"][1] if step >= hit)
        ratio = soap_s / adamw_s
        goal = GOALS["soap seconds to AdamW's loss"][0]
        self.rows.append(Row("to_loss", label, ratio=ratio, loss=target,
                             note=f"steps {hit}/{len(batches)} = {hit / len(batches):.2f}x, seconds {soap_s:.1f}/"
                                  f"{adamw_s:.1f} = {ratio:.2f}x (goal ≤ {goal:g}: {'met' if ratio <= goal else 'NOT met'})"))

    # -- output --------------------------------------------------------------------------------
    def table(self) -> str:
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        head = (f"gpu_suite on {dev}, torch {torch.__version__}{' (dry run)' if self.args.dry_run else ''}; "
                f"step rows on {self.n_params:,} parameters; x = ratio to fused AdamW's amortized step "
                f"({self.adamw_amortized_ms:.3f} ms), mfu rows to the eager plain loop, to_loss: seconds to AdamW's loss")
        lines = [head, f"{'section':<9}{'row':<44}{'median ms':>10}{'amort. ms':>10}{'x':>8}{'B/param':>9}"
                       f"{'first s':>9}{'loss':>8}  note"]

        def f(v: float, spec: str) -> str:
            return format(v, spec) if math.isfinite(v) else "-"

        for r in self.rows:
            lines.append(f"{r.section:<9}{r.name[:43]:<44}{f(r.median_ms, '10.3f'):>10}{f(r.amortized_ms, '10.3f'):>10}"
                         f"{f(r.ratio, '8.2f'):>8}{f(r.bytes_per_param, '9.2f'):>9}{f(r.first_s, '9.2f'):>9}"
                         f"{f(r.loss, '8.4f'):>8}  {r.note}")
        lines.append(f"total {time.perf_counter() - self.t0:.1f} s")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test runs)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--sections", default="step,options,mfu,to_loss", help="comma-separated subset")
    p.add_argument("--budget-s", type=float, default=450.0, help="no new row starts after this many seconds")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU, or pass --dry-run for the CPU smoke run")
    sections = [s for s in args.sections.split(",") if s]
    known = ("step", "options", "mfu", "to_loss")
    unknown = [s for s in sections if s not in known]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(known)}")
    suite = Suite(args)
    if "step" not in sections:  # every ratio needs the fused AdamW baseline
        opt = build_optimizer(suite.params, suite._spec("adamw"))
        _, med, amort = suite.time_optimizer(opt)
        suite.adamw_ms, suite.adamw_amortized_ms = med * 1e3, amort * 1e3
    for name in sections:
        getattr(suite, f"{name}_section")()
        print(f"[{name} done at {time.perf_counter() - suite.t0:.0f} s]", flush=True)
    print(suite.table())
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "dry_run": args.dry_run,
                                               "rows": [dataclasses.asdict(r) for r in suite.rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
