"""The findings table of the small-scale study campaign (docs/studies.md), from the sweeps' results.

Reads ``<runs>/<recipe>-small/results.csv`` for the seven study recipes, rebuilds each sweep's
report (``optlab report``'s tables and figures), reads the μP learning-rate transfer's combined
JSONs (``--mup``, for R5) and its depth JSON (``--mup-depth``, for R5d), and writes into ``--out``:

* ``<recipe>.csv``: the sweep's results table, as committed evidence;
* ``<recipe>_loss_vs_lr.png`` (or ``_loss_vs_<axis>.png``) and ``<recipe>_curves.png``: its figures;
* ``findings.json``: per finding (R1, R1m, R2-R6, R5d: R5 across depth) the numbers it rests on and its verdict;
* ``findings.md``: the same as a markdown table.

Verdicts follow fixed rules, stated in ``RULES`` and printed in the table, so that a rerun on other
hardware or more seeds is judged the same way:

* "comparable" means within ``TOL`` nats (the sweeps' own tolerance, 0.1) of each other;
* a comparison is only made at optima the grid brackets (best value inside the grid); otherwise
  "cannot tell" (extend the grid);
* a gap smaller than twice the seed spread measured in the same recipe is "within the seed spread".

    python scripts/studies_findings.py --runs optlab_runs --out docs/img/studies_small
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

from lightning_optlab.sweep import build_report, read_csv

TOL = 0.1  # nats: the sweeps' tolerance; "comparable" within it
RECIPES = ("lr_sweep", "momentum_sweep", "adam_vs_signum", "adalayer_ablations", "soap_vs_adamw_shampoo",
           "soap_precondition_frequency", "adamw_lion_sophia_budget")
#: the μP learning-rate transfer runs R5 reads (`optlab mup lr-transfer` combined JSONs), per optimizer
MUP_RUNS = {"adamw": "docs/img/mup_lr_transfer_qknorm_7seeds.json", "lion": "docs/img/mup_lr_transfer_qknorm_7seeds.json",
            "sophia": "docs/img/mup_lr_transfer_sophia.json"}
ADAPTIVE = ("adamw", "adafactor", "lion", "signum", "sophia")
RULES = (f"comparable = best losses within {TOL} nats; only optima inside their grids are compared (else: cannot "
         "tell); a difference under twice the seed spread of the same recipe is within noise")


def _load(runs: Path, recipe: str) -> dict[str, Any] | None:
    folder = runs / f"{recipe}-small"
    if not (folder / "results.csv").exists():
        return None
    report = build_report(folder)
    rows = read_csv(folder / "results.csv")
    summaries = {s["label"]: s for s in report["summaries"]}
    done = [r for r in rows if r.get("status") in ("done", "diverged")]
    return {"folder": folder, "rows": rows, "summaries": summaries, "race": report["race"], "files": report["files"],
            "done": len(done), "total": len(rows)}


def _spread(study: dict[str, Any]) -> float | None:
    """The largest seed standard deviation at any run's best point of the recipe (None: one seed only)."""
    stds = [e["seed_std"] for e in _seeded(study)]
    return max(stds) if stds else None


def _seeded(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run whose best point has more than one seed: its mean, seed std and seed count."""
    return [{"label": label, "loss": s["best_loss"], "at": s["best"], "seed_std": s["seed_std"], "seeds": s["seeds"]}
            for label, s in study["summaries"].items() if s.get("seed_std") is not None]


def _best(study: dict[str, Any] | None, label: str) -> dict[str, Any] | None:
    if study is None or label not in study["summaries"]:
        return None
    s = study["summaries"][label]
    return {"label": label, "loss": s["best_loss"], "at": s["best"], "bracketed": s["bracketed"],
            "seed_std": s["seed_std"], "seeds": s["seeds"], "width_decades": s["width_decades"],
            "steps_away": s["steps_away"]}


def _bracketed(*entries: dict[str, Any] | None) -> bool:
    return all(e is not None and e["bracketed"] in ("yes", None) and math.isfinite(e["loss"]) for e in entries)


def _noise(study: dict[str, Any] | None) -> float:
    spread = _spread(study) if study is not None else None
    return 2 * spread if spread is not None else 0.0


def _verdict(parts: dict[str, bool | None]) -> tuple[str, str]:
    """holds (every part yes), does not hold (every part no), partly, or cannot tell (no part decidable);
    a part that is None cannot be told (e.g. an optimum at the edge of its grid)."""
    known = [v for v in parts.values() if v is not None]
    verdict = ("cannot tell" if not known else "holds" if len(known) == len(parts) and all(known)
               else "does not hold" if not any(known) else "partly")
    why = "; ".join(f"{k}: {'cannot tell' if v is None else 'yes' if v else 'no'}" for k, v in parts.items())
    return verdict, why


def _r1(lr: dict[str, Any] | None) -> dict[str, Any]:
    rows = [_best(lr, label) for label in (*ADAPTIVE, "sgd")]
    if lr is None or any(r is None for r in rows):
        return {"verdict": "cannot tell", "why": "lr_sweep has not run every optimizer", "rows": rows}
    adaptive, sgd = rows[:-1], rows[-1]
    losses = [r["loss"] for r in adaptive]
    spread = max(losses) - min(losses)
    gap = sgd["loss"] - max(losses)
    widths = [r["width_decades"] for r in adaptive]
    out = {"rows": rows, "adaptive_spread": spread, "sgd_gap_to_worst_adaptive": gap,
           "adaptive_widths": widths, "sgd_width": sgd["width_decades"]}
    if not _bracketed(*adaptive):
        out.update(verdict="cannot tell", why="an adaptive optimizer's optimum is at the edge of its grid")
    elif spread <= max(TOL, _noise(lr)) and gap > TOL:
        out.update(verdict="holds", why=f"adaptive best losses within {spread:.3f} nats; SGD {gap:.3f} worse than the "
                                         "worst of them")
    else:
        out.update(verdict="does not hold", why=f"adaptive spread {spread:.3f} nats, SGD gap {gap:.3f}")
    return out


#: "a wide range of beta1": within the tolerance of the best over at least this interval
MOMENTUM_WIDE = (0.5, 0.9)


def _axis_losses(study: dict[str, Any], label: str, axis: str) -> dict[float, float]:
    """Axis value -> seed-mean final validation loss of a label's finished points."""
    by: dict[float, list[float]] = {}
    for r in study["rows"]:
        if r["label"] == label and r.get("status") == "done" and r.get(axis) is not None:
            by.setdefault(float(r[axis]), []).append(float(r["final_val_loss"]))
    return {k: statistics.mean(v) for k, v in sorted(by.items())}


def _r1m(mom: dict[str, Any] | None) -> dict[str, Any]:
    """Momentum: every adaptive optimizer keeps its loss over a wide range of beta1; SGD needs a high one."""
    labels = ("adamw", "adafactor", "lion", "signum", "sgd")
    if mom is None or any(label not in mom["summaries"] for label in labels):
        return {"verdict": "cannot tell", "why": "the momentum sweep has not run every optimizer"}
    losses = {label: _axis_losses(mom, label, "momentum") for label in labels}
    ranges = {label: mom["summaries"][label]["range"] for label in labels}
    lo, hi = MOMENTUM_WIDE
    wide = {label: ranges[label] is not None and ranges[label][0] <= lo and ranges[label][1] >= hi
            for label in labels[:-1]}
    sgd = losses["sgd"]
    best_b1 = min(sgd, key=sgd.get)
    sgd_low = min(sgd)
    parts = {f"every adaptive optimizer within {TOL} nats of its best over beta1 {lo}-{hi}": all(wide.values()),
             f"SGD needs a high momentum (beta1 {sgd_low:g} over {TOL} nats worse than its best)":
                 sgd[sgd_low] - sgd[best_b1] > TOL and best_b1 >= 0.9}
    out = {"losses": losses, "ranges": ranges, "wide": wide, "parts": parts}
    out["verdict"], out["why"] = _verdict(parts)
    narrow = [label for label, ok in wide.items() if not ok]
    out["why"] += (f" (beta1 range within {TOL}: "
                   + ", ".join(f"{k} [{v[0]:g}, {v[1]:g}]" for k, v in ranges.items() if v) + ")"
                   + (f"; narrow: {', '.join(narrow)}" if narrow else ""))
    return out


def _r2(lr: dict[str, Any] | None, avs: dict[str, Any] | None) -> dict[str, Any]:
    adam_eq = _best(avs, "adam_b1=b2=0.95")
    signum_eq = _best(avs, "signum_b=0.95")
    adam = _best(lr, "adamw")  # Adam (0.9, 0.95): the learning-rate sweep's identical point
    signum = _best(lr, "signum")  # Signum at beta 0.9
    rows = [adam_eq, signum_eq, adam, signum]
    if any(r is None for r in rows):
        return {"verdict": "cannot tell", "why": "a run has not finished", "rows": rows}
    gap_eq = signum_eq["loss"] - adam_eq["loss"]
    gap_std = signum["loss"] - adam["loss"]
    out = {"rows": rows, "signum_minus_adam_at_b1_eq_b2": gap_eq, "signum_minus_adam_at_0.9_0.95": gap_std}
    if not _bracketed(*rows):
        out.update(verdict="cannot tell", why="an optimum is at the edge of its grid")
    elif abs(gap_eq) <= TOL and abs(gap_eq) <= abs(gap_std):
        out.update(verdict="holds", why=f"Signum - Adam: {gap_eq:+.3f} at beta1 = beta2, {gap_std:+.3f} at (0.9, 0.95)")
    else:
        out.update(verdict="does not hold",
                   why=f"Signum - Adam: {gap_eq:+.3f} at beta1 = beta2, {gap_std:+.3f} at (0.9, 0.95)")
    return out


def _r3(ada: dict[str, Any] | None, lr: dict[str, Any] | None) -> dict[str, Any]:
    # AdamW and SGD everywhere: the learning-rate sweep's points (the same runs; tests/sweep/test_small_scale.py)
    rows = [_best(lr, "adamw")] + [_best(ada, label) for label in ("adalayer", "adalayer_frozen")] + [_best(lr, "sgd")] \
        + [_best(ada, label) for label in ("sgd+adalayer(readout)", "sgd+adalayer(readout+norm)")]
    if any(r is None for r in rows):
        return {"verdict": "cannot tell", "why": "a run has not finished", "rows": rows}
    adamw, adalayer, frozen, sgd, ro, ro_norm = rows
    gaps = {r["label"]: r["loss"] - adamw["loss"] for r in rows[1:]}
    out = {"rows": rows, "gap_to_adamw": gaps}
    if not _bracketed(adamw, adalayer, ro, ro_norm):  # frozen Adalayer runs at one rate, Adalayer's
        out.update(verdict="cannot tell", why="an optimum is at the edge of its grid")
        return out
    parts = {"adalayer recovers AdamW": gaps["adalayer"] <= TOL,
             "frozen Adalayer trains (within the tolerance of Adalayer)": frozen["loss"] - adalayer["loss"] <= TOL,
             "readout + norm closes the gap": gaps["sgd+adalayer(readout+norm)"] <= TOL,
             "readout alone does not": gaps["sgd+adalayer(readout)"] > TOL}
    out["parts"] = parts
    out["verdict"], out["why"] = _verdict(parts)
    return out


def _r4(soap: dict[str, Any] | None) -> dict[str, Any]:
    rows = [_best(soap, label) for label in ("adamw", "soap", "shampoo")]
    if any(r is None for r in rows):
        return {"verdict": "cannot tell", "why": "a run has not finished", "rows": rows}
    race = soap["race"]
    out = {"rows": rows, "race": race}
    if not _bracketed(*rows):
        out.update(verdict="cannot tell", why="an optimum is at the edge of its grid")
        return out
    soap_r, sham_r = race.get("soap", {}), race.get("shampoo", {})
    steps, secs = soap_r.get("step_ratio"), soap_r.get("seconds_ratio")
    parts = {"SOAP reaches AdamW's final loss in fewer steps": steps is not None and steps < 1,
             "and in less wall-clock": secs is not None and secs < 1,
             "SOAP ends below Shampoo": rows[1]["loss"] < rows[2]["loss"],
             "fewer steps than Shampoo": steps is not None and (sham_r.get("step_ratio") is None
                                                                 or steps < sham_r["step_ratio"])}
    out["parts"] = parts
    out["verdict"], why = _verdict(parts)

    def ratio(r: dict[str, Any], k: str) -> str:
        return "never" if r.get(k) is None else f"{r[k]:.2f}x"

    out["why"] = (why + f" (to AdamW's final held-out loss: SOAP {ratio(soap_r, 'step_ratio')} its steps, "
                  f"{ratio(soap_r, 'seconds_ratio')} its wall-clock; Shampoo {ratio(sham_r, 'step_ratio')}, "
                  f"{ratio(sham_r, 'seconds_ratio')}; best losses "
                  + ", ".join(f"{r['label']} {r['loss']:.3f} at {_at(r['at'])}" for r in rows) + ")")
    return out


#: the f = 10 baseline of the frequency study: the SOAP study's point at the frequency study's rate
#: (the same run but for f; tests/sweep/test_small_scale.py checks it)
FREQUENCY_BASELINE = {"soap": "soap__lr=0.01__seed=0", "shampoo": "shampoo__lr=0.0316__seed=0"}


def _r4b(freq: dict[str, Any] | None, soap: dict[str, Any] | None) -> dict[str, Any]:
    if freq is None or soap is None:
        return {"verdict": "cannot tell", "why": "the frequency study or the SOAP study has not run", "rows": []}
    by: dict[str, dict[int, float]] = {}
    for r in freq["rows"]:
        if r.get("status") == "done":
            f = r.get("optimizer.hparams.precondition_frequency", r.get("precondition_frequency"))
            by.setdefault(r["label"], {})[int(f)] = float(r["final_val_loss"])
    for label, point in FREQUENCY_BASELINE.items():
        row = next((r for r in soap["rows"] if r["point"] == point and r.get("status") == "done"), None)
        if row is not None:
            by.setdefault(label, {})[10] = float(row["final_val_loss"])
    if not all(len(by.get(k, {})) >= 2 for k in ("soap", "shampoo")):
        return {"verdict": "cannot tell", "why": "a frequency has not finished", "losses": by}
    lo, hi = min(by["soap"]), max(by["soap"])
    deg = {k: by[k][hi] - by[k][lo] for k in ("soap", "shampoo")}
    out = {"losses": by, "degradation": deg, "from": lo, "to": hi}
    out["verdict"] = "holds" if deg["soap"] < deg["shampoo"] else "does not hold"
    out["why"] = f"loss change from f={lo} to f={hi}: SOAP {deg['soap']:+.3f}, Shampoo {deg['shampoo']:+.3f}"
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _r6_lr(lr: dict[str, Any] | None) -> dict[str, Any]:
    """Lion fastest: its optimizer step is the cheapest (the forward and backward pass are the same for all
    three, and two points share the machine, so whole-step times carry the neighbour's noise; both are given)."""
    labels = ("adamw", "lion", "sophia")
    rows = [_best(lr, label) for label in labels]
    if lr is None or any(r is None for r in rows):
        return {"verdict": "cannot tell", "why": "lr_sweep has not run AdamW, Lion and Sophia", "rows": rows}
    times = {label: _step_times(lr, "label", label) for label in labels}  # per step, median over the run's points
    step_s = {label: v[0] for label, v in times.items()}
    opt_ms = {label: v[1] for label, v in times.items()}
    out = {"rows": rows, "seconds_per_step": step_s, "optimizer_ms_per_step": opt_ms}
    known = {k: v for k, v in opt_ms.items() if v is not None}
    fastest = min(known, key=known.get) if len(known) == 3 else None
    lowest = min(rows, key=lambda r: r["loss"])["label"]
    parts = {"Lion fastest (optimizer step)": fastest == "lion",
             "Sophia lowest loss": lowest == "sophia" and _bracketed(*rows)}
    out["parts"] = parts
    out["verdict"], _ = _verdict(parts)
    out["why"] = (f"optimizer step {', '.join(f'{k} {v:.1f} ms' for k, v in known.items())} of "
                  f"{', '.join(f'{k} {v:.3f} s' for k, v in step_s.items() if v)} a step; lowest loss: {lowest}; "
                  "downstream accuracy cannot be told at 0.3M parameters (chance level)")
    return out


def _step_times(study: dict[str, Any], field: str, value: str) -> tuple[float | None, float | None]:
    """Median seconds per step and optimizer milliseconds per step over the finished points whose ``field``
    (``label``, or ``optimizer``: every label it runs under) is ``value``; points that resumed are left out
    (their clock restarted)."""
    pts = [r for r in study["rows"] if r.get(field) == value and r.get("status") == "done"
           and r.get("train_seconds") and not r.get("resumed_from_step")]
    step = _median([float(r["train_seconds"]) / float(r["steps"]) for r in pts])
    opt = _median([1e3 * float(r["optimizer_share"]) * float(r["train_seconds"]) / float(r["steps"])
                   for r in pts if r.get("optimizer_share") not in (None, "")])
    return step, opt


def _r6(budget: dict[str, Any] | None, lr: dict[str, Any] | None) -> dict[str, Any]:
    """The budget study: Lion fastest, Sophia lowest loss, AdamW best downstream; GPT-2 better with Sophia and
    AdamW, LLaMA with Lion; LLaMA at about twice GPT-2's rate. Without it, the learning-rate sweep's three."""
    if budget is None:
        return _r6_lr(lr)
    opts, fams = ("adamw", "lion", "sophia"), ("gpt2", "llama")
    best = {(o, f): _best(budget, f"{o}-{f}") for o in opts for f in fams}
    if any(b is None for b in best.values()):
        return {"verdict": "cannot tell", "why": "the budget study has not run every optimizer and family"}
    times = {o: _step_times(budget, "optimizer", o) for o in opts}
    step_s = {o: v[0] for o, v in times.items()}
    opt_ms = {o: v[1] for o, v in times.items()}
    known = {k: v for k, v in opt_ms.items() if v is not None}
    fastest = min(known, key=known.get) if len(known) == len(opts) else None
    in_grid = {f: _bracketed(*(best[(o, f)] for o in opts)) for f in fams}
    rank = {f: sorted(opts, key=lambda o: best[(o, f)]["loss"]) for f in fams}
    ratios = {o: best[(o, "llama")]["at"]["lr"] / best[(o, "gpt2")]["at"]["lr"] for o in opts}
    accs = {}
    for (o, f), b in best.items():
        scores = [v for k, v in budget["summaries"][f"{o}-{f}"]["evals"].items() if k.endswith("/acc")]
        accs[f"{o}-{f}"] = statistics.mean(scores) if scores else None
    parts = {"Lion fastest (optimizer step)": fastest == "lion" if fastest else None,
             "Sophia lowest loss in both families": all(rank[f][0] == "sophia" for f in fams) if all(in_grid.values())
             else None,
             "Lion ranks higher on LLaMA than on GPT-2": rank["llama"].index("lion") < rank["gpt2"].index("lion")
             if all(in_grid.values()) else None,
             "LLaMA's best rate above GPT-2's (median over the three)": statistics.median(ratios.values()) > 1
             if all(in_grid.values()) else None}
    out = {"best": {f"{o}-{f}": b for (o, f), b in best.items()}, "seconds_per_step": step_s,
           "optimizer_ms_per_step": opt_ms, "rank": rank, "llama_over_gpt2_lr": ratios, "zero_shot_mean_acc": accs,
           "parts": parts}
    out["verdict"], why = _verdict(parts)
    out["why"] = (why + f". Optimizer step {', '.join(f'{k} {v:.1f} ms' for k, v in known.items())} in "
                  f"{', '.join(f'{k} {v:.3f} s' for k, v in step_s.items() if v)} steps; best loss "
                  + "; ".join(f"{f}: " + ", ".join(f"{o} {best[(o, f)]['loss']:.3f}" for o in rank[f]) for f in fams)
                  + ". Downstream: cannot tell (0.3M parameters, chance-level zero-shot on a handful of sample items)")
    return out


def _r5(mup_runs: dict[str, str | Path], root: Path) -> dict[str, Any]:
    """μP transfer per optimizer: the learning-rate transfer experiment's verdict (the fitted optimum moves
    at most the experiment's threshold across widths), from its combined JSONs."""
    per: dict[str, Any] = {}
    for opt, path in mup_runs.items():
        f = root / path
        if not f.exists():
            per[opt] = None
            continue
        data = json.loads(f.read_text())
        v = data.get("verdict", {}).get(opt)
        per[opt] = None if v is None else {**v, "seeds": data.get("seeds"), "file": str(path)}
    parts = {f"{opt}: μP's optimum transfers across width": None if v is None else bool(v["transfers"])
             for opt, v in per.items()}
    out = {"per_optimizer": per, "parts": parts}
    out["verdict"], out["why"] = _verdict(parts)
    shifts = ", ".join(f"{o} μP {v['mup_shift']:.2f} vs SP {v['sp_shift']:.2f} grid steps over {len(v['seeds'] or [])} "
                       "seeds" for o, v in per.items() if v)
    out["why"] += (f" (fitted drift of the optimum, widths 32-256, 150 steps: {shifts}; the transfer experiment's own "
                   "scale, not the small scale: docs/mup.md)")
    return out


#: R5 across depth: the depth learning-rate transfer's combined JSON (`optlab mup lr-transfer` with a
#: `depth_transfer:` recipe, docs/mup.md "LR transfer across depth"), and the rules it is judged under
MUP_DEPTH_RUN = "docs/img/mup_lr_transfer_depth.json"
DEPTH_RULES = ("none", "completep")  # width-only μP, and the rule the proxy -> target run compares it with


def _r5d(path: str | Path | None, root: Path) -> dict[str, Any]:
    """μP transfer across depth for AdamW, Lion and Sophia: per rule, whether the fitted optimum stays within the
    experiment's threshold (1 grid step) over depths 2-16; "cannot tell" where a depth's fitted optimum lies
    outside the grid (a flat or noisy curve, no vertex to read); the proxy -> target gaps in the evidence."""
    f = root / path if path else None
    if f is None or not f.exists():
        return {"verdict": "cannot tell", "why": f"the depth transfer has not run ({path})", "parts": {}}
    data = json.loads(f.read_text())
    parts: dict[str, bool | None] = {}
    ranges, gaps = [], []
    for opt in ("adamw", "lion", "sophia"):
        for rule in DEPTH_RULES:
            key = f"{opt}/{rule}"
            s, v = data.get("summary", {}).get(key), data.get("verdict", {}).get(key)
            if s is None or v is None:
                parts[f"{key} transfers across depth"] = None
                continue
            outside = s.get("fitted_outside_grid") or []
            parts[f"{key} transfers across depth"] = None if outside or v["shift_steps"] is None else bool(v["holds"])
            ranges.append(f"{key} {'fit outside the grid at L=' + str(outside) if outside else format(v['shift_steps'], '.2f')}")
            g = data.get("joint_gaps", {}).get(key)
            if g is not None:
                gaps.append(f"{key} {g['gap_nats']:.3f}")
    out = {"parts": parts, "file": str(path), "seeds": data.get("seeds")}
    out["verdict"], why = _verdict(parts)
    out["why"] = (why + f" (range of the fitted optimum over depths 2-16 at width 32, grid steps: {', '.join(ranges)}; "
                  f"proxy 32 x 2 -> target 128 x 8, loss at the proxy's rate minus the target's best, nats: "
                  f"{', '.join(gaps)}; {len(data.get('seeds') or [])} seeds, 100 steps: docs/mup.md)")
    return out


def findings(runs: Path, mup_runs: dict[str, str | Path] | None = None, root: Path = Path("."),
             mup_depth: str | Path | None = MUP_DEPTH_RUN) -> dict[str, Any]:
    studies = {name: _load(runs, name) for name in RECIPES}
    lr, avs, ada = studies["lr_sweep"], studies["adam_vs_signum"], studies["adalayer_ablations"]
    soap, freq = studies["soap_vs_adamw_shampoo"], studies["soap_precondition_frequency"]
    mom, budget = studies["momentum_sweep"], studies["adamw_lion_sophia_budget"]
    return {
        "rules": RULES,
        "progress": {k: (v["done"], v["total"]) if v else None for k, v in studies.items()},
        "seed_spread": {k: _spread(v) if v else None for k, v in studies.items()},
        "seeded_points": {k: seeded for k, v in studies.items() if v and (seeded := _seeded(v))},
        "R1": _r1(lr), "R1m": _r1m(mom), "R2": _r2(lr, avs), "R3": _r3(ada, lr), "R4": _r4(soap),
        "R4b": _r4b(freq, soap), "R5": _r5(mup_runs or {}, root), "R5d": _r5d(mup_depth, root),
        "R6": _r6(budget, lr),
    }, studies


TITLES = {"R1": "all but SGD comparable in best loss and LR stability",
          "R1m": "after the learning rate, β1: all but SGD keep their loss over a wide β1 range, SGD needs a high one",
          "R2": "Signum ≈ Adam, closest at β1 = β2",
          "R3": "Adalayer: last layer + LayerNorm needed, last layer alone not enough; frozen Adalayer trains",
          "R4": "SOAP fewer steps than AdamW and Shampoo, and less wall-clock",
          "R4b": "SOAP degrades less than Shampoo at infrequent preconditioning",
          "R5": "μP transfer for AdamW, Lion, Sophia",
          "R5d": "and across depth (width-only μP and CompleteP)",
          "R6": "Lion fastest, Sophia lowest loss, AdamW best downstream; GPT-2 better with Sophia and AdamW, LLaMA "
                "with Lion; LLaMA at ~2x GPT-2's rate"}


def _at(values: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in values.items())


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["| finding | verdict | evidence |", "|---|---|---|"]
    for key, title in TITLES.items():
        f = result[key]
        lines.append(f"| {key}: {title} | **{f['verdict']}** | {f.get('why', '')} |")
    lines += ["", f"Rules: {result['rules']}."]
    seeded = result.get("seeded_points") or {}
    if seeded:
        lines += ["", "Seed spread at the best points that ran several seeds (mean ± std over the seeds; every "
                  "other point ran one seed):"]
        for recipe, entries in seeded.items():
            parts = ", ".join(f"{e['label']} {e['loss']:.3f} ± {e['seed_std']:.3f} ({e['seeds']} seeds at "
                              f"{_at(e['at'])})" for e in entries)
            lines.append(f"- {recipe}: {parts}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="optlab_runs", help="folder holding <recipe>-small sweep folders")
    p.add_argument("--out", default="docs/img/studies_small", help="where the tables, figures and findings go")
    p.add_argument("--mup", nargs="*", metavar="OPT=JSON", default=None,
                   help="R5's μP transfer JSONs per optimizer (default: " +
                        ", ".join(f"{k}={v}" for k, v in MUP_RUNS.items()) + ")")
    p.add_argument("--mup-depth", default=MUP_DEPTH_RUN, metavar="JSON",
                   help=f"R5d's depth transfer JSON (default: {MUP_DEPTH_RUN})")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = [item for item in args.mup or [] if "=" not in item]
    if bad:
        p.error(f"--mup takes OPT=JSON pairs (e.g. sophia=docs/img/mup_lr_transfer_sophia.json), got {bad}")
    mup = MUP_RUNS if args.mup is None else dict(item.split("=", 1) for item in args.mup)
    result, studies = findings(Path(args.runs), mup, mup_depth=args.mup_depth)
    for name, study in studies.items():
        if study is None:
            continue
        shutil.copy(study["folder"] / "results.csv", out / f"{name}.csv")
        for f in study["files"]:
            if f.suffix == ".png":
                stem = "curves" if f.stem == "loss_curves" else f.stem
                shutil.copy(f, out / f"{name}_{stem}.png")
    (out / "findings.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "findings.md").write_text(to_markdown(result) + "\n")
    print(to_markdown(result))
    print("progress (done, total):", result["progress"])


if __name__ == "__main__":
    main()
