"""Why μP's tiny models get no better with width: one experiment per candidate cause.

The learning-rate transfer experiment (``optlab mup lr-transfer``) shows μP's optimum staying put
across widths, but μP's best held-out loss flat in width while SP's falls. Each *candidate* below
changes one thing in the μP runs (SP is run unchanged as the reference), trains AdamW at the
narrowest and the widest width over a small learning-rate grid around the optimum, for several
seeds, and reports per width the best-of-grid held-out loss (mean ± seed std) and the paired
μP − SP gap at the widest width:

* ``default``: the experiment as it is (init_std 0.02, attention 1/d relative to the base, one
  base learning rate for every role);
* ``init_std=X``: the base initialization scale (TP5 tunes it on the proxy; GPT-2's 0.02 was
  chosen for width 768, far below 1/sqrt(32) at the base width 32);
* ``attn_sqrt``: attention scale 1/sqrt(d_head) at every width instead of μP's 1/d (at d_head 8
  in the base and 64 at width 256 μP's scale is 2.8x smaller than SP's);
* ``vector_lr=F``: embedding, norm, readout and bias learning rates F times the hidden base rate;
* ``steps=N``: the training length;
* ``output_mult=X``: TP5's output multiplier (the logits × X on top of μP's base_width / width),
  tuned on the proxy;
* ``random_readout``: the readout initialized N(0, init_std²) instead of zero (TP5 §D.2 advises zero);
* ``head_dim=X``: widen by heads at a fixed head size X (n_head = width / X at every width, the proxy
  itself as μP's base), as model families grow; μP's 1/d attention scale is then SP's 1/sqrt(d);
* ``eps=X``: AdamW's ε at the base (μP divides it by m_in on the hidden matrices; 1e-12 makes it
  negligible at every width, which tests whether the ε rule matters);
* several joined by ``+`` (``attn_sqrt+init_std=0.1``): a combination.

The held-out set is 32 × 16 windows of 64 bytes (8x the lr-transfer recipe's), fixed per seed.

    OMP_NUM_THREADS=1 python benchmarks/mup_quality.py --seeds 0 1 2             # ~40 min on one core
    OMP_NUM_THREADS=1 python benchmarks/mup_quality.py --candidates default attn_sqrt init_std=0.1 \\
        --seeds 0 --json runs/mup_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_optlab.configure import OptimizerSpec, configure
from lightning_optlab.mup.experiment import eval_loss, fixed_batches, train_run, width_model

VECTOR_ROLES = ("embedding", "norm", "readout", "bias")


_FLAGS = ("default", "attn_sqrt", "random_readout")
_VALUES = ("init_std", "vector_lr", "steps", "output_mult", "eps", "head_dim")


def parse_candidate(text: str) -> dict:
    """``default``, ``attn_sqrt``, ``random_readout``, ``init_std=0.1``, ``vector_lr=0.25``, ``steps=600``,
    ``output_mult=4``, ``eps=1e-12``, ``head_dim=8``, or several joined by ``+`` (``attn_sqrt+init_std=0.1``)."""
    out: dict = {"name": text}
    for part in text.split("+"):
        if part in _FLAGS:
            out[part] = True
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in _VALUES:
            raise ValueError(f"unknown candidate {part!r} in {text!r}; use {', '.join(_FLAGS)}, "
                             f"{', '.join(k + '=X' for k in _VALUES)}, or several joined by '+'")
        try:
            out[key] = int(value) if key in ("steps", "head_dim") else float(value)
        except ValueError:
            raise ValueError(f"candidate {part!r}: {value!r} is not a number") from None
    return out


def train_point(cand: dict, *, mup: bool, width: int, log2_lr: float, seed: int, args: argparse.Namespace) -> float:
    """Held-out loss of one run (inf if it diverged)."""
    steps = int(cand.get("steps", args.steps))
    train = fixed_batches(steps, args.batch_size, args.seq_len, seed=seed)
    held = fixed_batches(32, 16, args.seq_len, seed=1000 + seed, offset=1)
    model_over = {"zero_readout": True, "qk_layernorm": True, "z_loss": 1e-4}
    # model-side changes apply to SP too when the candidate is marked so (--same-sp): both tuned alike
    both = mup or cand.get("sp_too", False)
    if both and "init_std" in cand:
        model_over["init_std"] = cand["init_std"]
    if both and cand.get("random_readout"):
        model_over["zero_readout"] = False
    if both and "output_mult" in cand:  # TP5's output multiplier, tuned on the proxy: × the base's logit scale
        model_over["logit_scale"] = cand["output_mult"]
    if both and "head_dim" in cand:  # grow heads, keep their size; μP's base is the proxy itself
        model_over["head_dim"] = int(cand["head_dim"])
    model = width_model(args.model, width, mup=mup, base_width=args.widths[0], seed=seed, **model_over)
    if mup and cand.get("attn_sqrt"):
        for mod in model.modules():
            if hasattr(mod, "scale") and "Attention" in type(mod).__name__:
                mod.scale = model.config.head_dim ** -0.5
    lr = 2.0 ** log2_lr
    overrides = {r: {"lr": lr * cand["vector_lr"]} for r in VECTOR_ROLES} if mup and "vector_lr" in cand else {}
    eps = {"eps": cand["eps"]} if mup and "eps" in cand else {}
    spec = OptimizerSpec(name="adamw", lr=lr, mup=mup, weight_decay=0.0, betas=(0.9, 0.95), schedule="cosine", **eps,
                         warmup_steps=int(0.1 * steps), total_steps=steps, min_lr_ratio=0.1, overrides=overrides)
    losses = train_run(model, lambda m: configure(m, spec), train, steps)
    ok = len(losses) == steps and all(math.isfinite(v) for v in losses)
    return eval_loss(model, held) if ok else math.inf


_MODEL_SIDE = ("init_std", "random_readout", "output_mult", "head_dim")


def _sp_name(cand: dict, same_sp: bool) -> str:
    """The SP reference a candidate is compared with: plain SP, or (``--same-sp``) SP with its model-side changes."""
    if same_sp and any(k in cand for k in _MODEL_SIDE):
        return "SP " + "+".join(f"{k}={cand[k]}" if k != "random_readout" else k for k in _MODEL_SIDE if k in cand)
    return "SP"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=["default", "init_std=0.1", "attn_sqrt", "vector_lr=0.25"])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--widths", type=int, nargs=2, default=[32, 256], metavar=("BASE", "WIDE"))
    p.add_argument("--mup-log2-lrs", type=float, nargs="+", default=[-6, -5, -4])
    p.add_argument("--sp-log2-lrs", type=float, nargs="+", default=[-10, -9, -8, -7],
                   help="SP's grid at the wide width (its optimum moves down with width)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--same-sp", action="store_true",
                   help="give SP the candidate's model-side changes too (init_std, random_readout, output_mult) "
                        "and compare each candidate with that SP: is the gain μP's own or the model's?")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    cands = [parse_candidate(c) for c in args.candidates]
    torch.set_num_threads(1)
    base, wide = args.widths
    t0 = time.perf_counter()
    # best[(candidate, parametrization, width, steps)][seed]
    best: dict[tuple[str, str, int, int], dict[int, float]] = {}
    for seed in args.seeds:
        for cand in cands:
            steps = int(cand.get("steps", args.steps))
            runs = [("mup", base, args.mup_log2_lrs), ("mup", wide, args.mup_log2_lrs)]
            sp_name = _sp_name(cand, args.same_sp)
            sp_cand = {**cand, "sp_too": True} if sp_name != "SP" else {"name": "SP", "steps": steps}
            if (sp_name, "sp", wide, steps) not in best or seed not in best[(sp_name, "sp", wide, steps)]:
                runs.insert(0, ("sp", wide, args.sp_log2_lrs))  # SP (as it is, or alike) at the candidate's length
            for par, width, grid in runs:
                vals = [train_point(cand if par == "mup" else sp_cand, mup=par == "mup",
                                    width=width, log2_lr=lg, seed=seed, args=args) for lg in grid]
                key = (cand["name"], par, width, steps) if par == "mup" else (sp_name, "sp", width, steps)
                best.setdefault(key, {})[seed] = min(vals)
                print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {key[0]:>14s} {par} width {width}: "
                      + " ".join(f"{v:.3f}" for v in vals), flush=True)

    def ms(d: dict[int, float]) -> str:
        v = list(d.values())
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    print(f"\nAdamW, {args.model}, widths {base} → {wide}, {args.steps} steps (unless the candidate sets them), "
          f"seeds {args.seeds}; best-of-grid held-out loss, mean ± seed std")
    print(f"{'candidate (μP)':<16}{'width ' + str(base):>16}{'width ' + str(wide):>16}{'wide − base':>18}"
          f"{'SP at ' + str(wide):>16}{'μP − SP at ' + str(wide):>20}")
    table = {}
    for cand in cands:
        steps = int(cand.get("steps", args.steps))
        b, w = best[(cand["name"], "mup", base, steps)], best[(cand["name"], "mup", wide, steps)]
        sp = best[(_sp_name(cand, args.same_sp), "sp", wide, steps)]
        gain = {s: w[s] - b[s] for s in args.seeds}
        gap = {s: w[s] - sp[s] for s in args.seeds}
        table[cand["name"]] = {"base": b, "wide": w, "sp_wide": sp, "wide_minus_base": gain, "mup_minus_sp": gap,
                               "sp_reference": _sp_name(cand, args.same_sp)}
        print(f"{cand['name']:<16}{ms(b):>16}{ms(w):>16}{ms(gain):>18}{ms(sp):>16}{ms(gap):>20}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
