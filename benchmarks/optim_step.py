"""Step time and state memory of every registered optimizer, as ratios to torch AdamW.

Times ``optimizer.step()`` on a GPT-like parameter set (token embedding, ``--layers`` blocks of
attention and MLP matrices with biases and LayerNorms, final norm, readout) with fixed random
gradients. Optimizers are timed in interleaved rounds against the AdamW baseline (foreach on CPU,
fused on CUDA unless ``--baseline``), so machine noise hits both alike; the table gives the median
ratio over rounds and the optimizer-state bytes per parameter.

Sophia's step is timed like the others; its Gauss-Newton-Bartlett estimator (an extra backward
every ``update_period`` steps) is timed separately on a small GPT and reported per estimate and
amortized, relative to the model's forward+backward.

    python benchmarks/optim_step.py                    # CPU, d=256, 4 layers
    python benchmarks/optim_step.py --device cuda --width 768 --layers 12 --vocab 50304
    python benchmarks/optim_step.py --peers-only --threads 1   # SOAP, Shampoo, Muon vs their peers

The last table times our SOAP, Shampoo and Muon against pytorch_optimizer's SOAP and Shampoo and
torch.optim.Muon (when installed: ``pip install -e .[bench]``) on the hidden matrices, in the
same run, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lightning_optlab import OptimizerSpec, build_optimizer
from lightning_optlab.optim import available_optimizers, get_optimizer_class
from lightning_optlab.optim.registry import canonical_name

# Hyperparameters per benchmark row (learning rates are irrelevant to timing).
ROWS: dict[str, dict] = {
    "adamw": dict(name="adamw", lr=1e-3, weight_decay=0.1),
    "sgd": dict(name="sgd", lr=1e-2, betas=(0.98, 0.0)),
    "adagrad": dict(name="adagrad", lr=1e-2),
    "adafactor": dict(name="adafactor", lr=1e-3, weight_decay=0.1),
    "lion": dict(name="lion", lr=1e-4, weight_decay=0.1),
    "signum": dict(name="signum", lr=1e-4, weight_decay=0.1),
    "adalayer": dict(name="adalayer", lr=1e-3, weight_decay=0.1),
    "sophia": dict(name="sophia", lr=1e-4, weight_decay=0.1),
    "adam_mini": dict(name="adam_mini", lr=1e-3, weight_decay=0.1),
    "schedule_free_adamw": dict(name="schedule_free_adamw", lr=1e-3, weight_decay=0.1),
    "shampoo": dict(name="shampoo", lr=1e-3, hparams={"precondition_frequency": 10}),
    # the vocabulary side (8192) is left unrotated here: at the default max_precond_dim=10000 its
    # 8192x8192 eigendecomposition alone takes minutes on a CPU
    "soap": dict(name="soap", lr=3e-3, hparams={"precondition_frequency": 10, "max_precond_dim": 1024}),
    "muon": dict(name="muon", lr=0.02, mix=[dict(optimizer="adamw", roles=["embedding", "readout", "norm", "bias"],
                                                 lr=1e-3)]),
}

#: the issue's bars (ratio to AdamW), where one is set
BARS = {"lion": 0.8, "signum": 0.8, "adalayer": 1.0, "adafactor": 1.2, "adam_mini": 1.1, "sophia": 1.3}


class ParamSet(torch.nn.Module):
    """The parameters of a GPT-2-style model (names as the reference model uses them)."""

    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        d = width
        self.wte = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.ln_1, blk.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            blk.attn = torch.nn.Module()
            blk.attn.c_attn, blk.attn.c_proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            blk.c_fc, blk.c_proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.blocks.append(blk)
        self.ln_f = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)


def _grads(model: torch.nn.Module, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randn(p.shape, generator=g).mul_(1e-3).to(device) for p in model.parameters()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for key, val in state.items():
            if torch.is_tensor(val) and key != "step" and val.numel() > 1:
                total += val.numel() * val.element_size()
    return total


def _row(label: str) -> dict:
    """The benchmark row of ``label``; an optimizer registered without one (``register_optimizer``)
    gets its declared default lr, with AdamW on the other roles when it takes matrices only."""
    if label in ROWS:
        return dict(ROWS[label])
    cls = get_optimizer_class(label)
    row = dict(name=label, lr=cls.hparam_defaults().get("lr", 1e-3))
    if cls.traits.matrix_only:
        row["mix"] = [dict(optimizer="adamw", roles=["embedding", "readout", "norm", "bias"], lr=1e-3)]
    return row


def _make(label: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    row = _row(label)
    hparams = dict(row.pop("hparams", {}))
    if label == "adamw":
        hparams["fused" if args.device.startswith("cuda") and args.baseline == "fused" else "foreach"] = True
    if label == "adam_mini":
        hparams["n_heads"] = args.heads
    return build_optimizer(model, OptimizerSpec(**row, hparams=hparams))


def _time_steps(opt: torch.optim.Optimizer, device: torch.device, n: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _estimator_cost(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Seconds of one training step (forward, backward, Sophia step) of a small GPT, and the
    extra seconds of one Sophia-G estimate (label sampling plus an extra backward)."""
    from lightning_optlab.models import GPT, GPTConfig
    from lightning_optlab.optim import sophia_gnb_estimate

    model = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                          n_embd=args.width)).to(device)
    # update_period=1: an estimate is due at every step, so the with-estimate steps all pay it
    opt = build_optimizer(model, OptimizerSpec(name="sophia", lr=1e-4, hparams={"update_period": 1}))
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)

    def train_step(estimate: bool) -> None:
        logits = model(x[:, :-1])
        loss = model.loss(logits, x[:, 1:])
        if estimate and not sophia_gnb_estimate(opt, logits):
            raise RuntimeError("the Sophia estimate was expected to be due at every step")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step(False)
    for _ in range(2):
        train_step(True)
    plain, with_est = [], []
    for _ in range(args.rounds):
        for flag, bucket in ((False, plain), (True, with_est)):
            _sync(device)
            t0 = time.perf_counter()
            train_step(flag)
            _sync(device)
            bucket.append(time.perf_counter() - t0)
    return statistics.median(plain), statistics.median(with_est) - statistics.median(plain)


#: the issue's bars against peer implementations (ours / peer, same parameters, same frequency)
PEER_BARS = {"soap": 0.5, "shampoo": 0.5, "muon": 1.0}


def _peers(hidden: list[torch.Tensor]) -> dict[str, tuple[object, object, str]]:
    """``{row: (ours, peer, peer name)}`` on the hidden matrices, for the peers that are installed."""
    from lightning_optlab.optim import SOAP, Muon, Shampoo

    out: dict[str, tuple[object, object, str]] = {}
    try:
        import pytorch_optimizer as po
    except ImportError:
        po = None
    if po is not None:
        out["soap"] = (SOAP(hidden, lr=3e-3, weight_decay=0.01, precondition_frequency=10),
                       po.SOAP(hidden, lr=3e-3, weight_decay=0.01, precondition_frequency=10),
                       "pytorch_optimizer.SOAP")
        out["shampoo"] = (Shampoo(hidden, lr=1e-3, precondition_frequency=10),
                          po.Shampoo(hidden, lr=1e-3, preconditioning_compute_steps=10),
                          "pytorch_optimizer.Shampoo")
    if hasattr(torch.optim, "Muon"):
        out["muon"] = (Muon(hidden, lr=0.02), torch.optim.Muon(hidden, lr=0.02), "torch.optim.Muon")
    return out


class Floor:
    """The matrix work one step of SOAP or Shampoo cannot avoid, as bare torch calls.

    Per matrix G (m x n) and step: SOAP rotates G into the eigenbasis and the update back
    (``Q_Lᵀ G Q_R`` and ``Q_L X Q_Rᵀ``: four products) and updates both factors (``G Gᵀ`` and
    ``Gᵀ G``); Shampoo applies both roots (two products) and updates both factors. Every
    ``freq`` steps each factor is refreshed: SOAP ``F Q`` and its Householder QR (Q only), Shampoo one
    ``eigh`` and the root ``V diag(w) Vᵀ``. Nothing else is timed: no elementwise Adam or grafting,
    no checks, no bookkeeping, so any implementation of the same algorithm with the same torch
    kernels is slower than this. With ``syrk`` the factor updates use BLAS's symmetric rank-k
    update (one triangle, about half the flops; torch has no such op, SciPy's BLAS does).
    """

    def __init__(self, kind: str, grads: list[torch.Tensor], freq: int = 10, beta: float = 0.95,
                 syrk: bool = False) -> None:
        self.kind, self.freq, self.beta, self.t = kind, freq, beta, 0
        self.grads = [g.detach().float().contiguous() for g in grads]
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.factors: list[list[torch.Tensor]] = []
        self.bases: list[list[torch.Tensor]] = []
        for g in self.grads:
            fs, qs = [], []
            for d in g.shape:
                a = torch.randn(d, d, generator=gen)
                fs.append((a @ a.T / d).to(g.device))
                qs.append(torch.linalg.qr(torch.randn(d, d, generator=gen))[0].to(g.device))
            self.factors.append(fs)
            self.bases.append(qs)
        self.syrk = None
        if syrk:
            from scipy.linalg import blas  # CPU float32 only

            self.syrk = blas.ssyrk
            # Fortran-ordered views (the transposes) of the factors: ssyrk updates one triangle in place
            self.np_factors = [[f.numpy().T for f in fs] for fs in self.factors]

    def step(self) -> None:
        self.t += 1
        keep, add = self.beta, 1.0 - self.beta
        for k, g in enumerate(self.grads):
            (ql, qr), (fl, fr) = self.bases[k], self.factors[k]
            if self.kind == "soap":
                x = ql.T @ g @ qr
                ql @ x @ qr.T
            else:  # shampoo: the roots live where the bases do
                ql @ g @ qr
            if self.syrk is not None:
                gn = g.numpy()  # C order (m, n) = Fortran order (n, m) of Gᵀ
                self.syrk(add, gn.T, beta=keep, c=self.np_factors[k][0], trans=1, lower=1, overwrite_c=1)
                self.syrk(add, gn.T, beta=keep, c=self.np_factors[k][1], trans=0, lower=1, overwrite_c=1)
            else:
                fl.addmm_(g, g.T, beta=keep, alpha=add)
                fr.addmm_(g.T, g, beta=keep, alpha=add)
        if self.t % self.freq:
            return
        for fs, qs in zip(self.factors, self.bases):
            for f, q in zip(fs, qs):
                if self.kind == "soap":
                    torch.linalg.householder_product(*torch.geqrf(f @ q))  # Q only (no R)
                else:
                    w, v = torch.linalg.eigh(f)
                    (v * w.clamp_min(0).add(1e-12).pow(-0.25)) @ v.T


def _peer_section(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> None:
    """Our matrix preconditioners against peer implementations on the hidden matrices (the
    attention and MLP weights: the embedding and readout's vocabulary side would cost the peers,
    which precondition every side, minutes per refresh), interleaved, f = 10 for all, so each
    10-step round holds one refresh: the times are amortized over ``--rounds`` refreshes."""
    hidden = [p for n, p in model.named_parameters() if n.startswith("blocks") and p.ndim == 2]
    pairs = _peers(hidden)
    if not pairs:
        print("\npeers: none installed (pip install pytorch_optimizer; torch>=2.9 has torch.optim.Muon)")
        return
    for row, (ours, peer, name) in list(pairs.items()):  # warm-up: state, first eigendecompositions
        try:
            for opt in (ours, peer):
                for _ in range(3):
                    opt.step()
        except RuntimeError as err:  # a peer's root computation can fail on these factors
            print(f"\n{row}: {name} failed during warm-up, left out: {str(err).splitlines()[0]}")
            del pairs[row]
    floors = _floors(pairs, hidden, device)
    initial = [p.detach().clone() for p in hidden]
    times: dict[str, tuple[list[float], list[float]]] = {row: ([], []) for row in pairs}
    floor_times: dict[tuple[str, str], list[float]] = {key: [] for key in floors}
    for r in range(args.rounds):
        for row, (ours, peer, name) in list(pairs.items()):
            order = ((ours, 0), (peer, 1)) if r % 2 == 0 else ((peer, 1), (ours, 0))
            for opt, i in order:
                try:
                    times[row][i].append(_time_steps(opt, device, args.steps))
                except RuntimeError as err:  # e.g. a peer's SVD failing to converge on a refresh
                    who = name if i else f"our {row}"
                    print(f"\n{row}: {who} failed in round {r + 1}, row left out: {str(err).splitlines()[0]}")
                    del pairs[row], times[row]
                    break
                finally:
                    with torch.no_grad():
                        for p, p0 in zip(hidden, initial):
                            p.copy_(p0)
            for (frow, variant), floor in floors.items():
                if frow == row:
                    floor_times[(frow, variant)].append(_time_steps(floor, device, args.steps))
    n = sum(p.numel() for p in hidden)
    print(f"\nmatrix preconditioners vs peers on the {len(hidden)} hidden matrices ({n:,} parameters), "
          f"f=10, amortized over {args.rounds} rounds of {args.steps} steps")
    print(f"{'optimizer':<10}{'peer':<28}{'ours ms':>9}{'peer ms':>9}{'ratio':>7}{'bar':>6}{'ok':>5}")
    for row, (ours_t, peer_t) in times.items():
        ratio = statistics.median([a / b for a, b in zip(ours_t, peer_t)])
        bar = PEER_BARS[row]
        print(f"{row:<10}{pairs[row][2]:<28}{statistics.median(ours_t) * 1e3:>9.2f}"
              f"{statistics.median(peer_t) * 1e3:>9.2f}{ratio:>7.2f}{bar:>6.1f}{'yes' if ratio <= bar else 'NO':>5}")
    if not any(k[0] in times for k in floor_times):
        return
    print("\nfloors (the matrix work the algorithm cannot skip, bare torch calls; see Floor), same rounds:")
    print(f"{'optimizer':<10}{'floor':<28}{'ms':>9}{'/ peer':>9}{'/ ours':>8}")
    for (row, variant), ts in floor_times.items():
        if row not in times or not ts:
            continue
        ours_t, peer_t = times[row]
        print(f"{row:<10}{variant:<28}{statistics.median(ts) * 1e3:>9.2f}"
              f"{statistics.median([f / b for f, b in zip(ts, peer_t)]):>9.2f}"
              f"{statistics.median([f / a for f, a in zip(ts, ours_t)]):>8.2f}")


def _floors(pairs: dict, hidden: list[torch.Tensor], device: torch.device) -> dict[tuple[str, str], Floor]:
    """Floor steps for the SOAP and Shampoo rows: torch's products, and on one CPU thread (when
    SciPy is installed) also with SciPy's BLAS ``ssyrk`` for the factor updates (with more
    threads SciPy's OpenBLAS pool and torch's OpenMP pool contend, which would time the contention)."""
    grads = [p.grad for p in hidden]
    out: dict[tuple[str, str], Floor] = {}
    for row in ("soap", "shampoo"):
        if row not in pairs:
            continue
        out[(row, "torch mm/addmm")] = Floor(row, grads)
        if device.type == "cpu" and torch.get_num_threads() == 1:  # two BLAS thread pools contend
            try:
                out[(row, "factors by BLAS ssyrk")] = Floor(row, grads, syrk=True)
            except ImportError:
                pass
    for floor in out.values():  # warm-up, as the optimizers had
        for _ in range(3):
            floor.step()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128, help="sequence length for the estimator timing")
    p.add_argument("--batch", type=int, default=8, help="batch size for the estimator timing")
    p.add_argument("--steps", type=int, default=10, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median is reported)")
    p.add_argument("--baseline", choices=["foreach", "fused"], default="fused")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--optimizers", default="", help="comma-separated subset (default: all registered)")
    p.add_argument("--no-peers", action="store_true", help="skip the comparison with peer implementations")
    p.add_argument("--peers-only", action="store_true", help="only the comparison with peer implementations")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    labels = [canonical_name(o) for o in args.optimizers.split(",") if o] or available_optimizers()
    missing = [n for n in labels if n not in ROWS]
    if missing:
        print(f"note: no benchmark row for {missing}: their declared default lr is used", file=sys.stderr)
    if "adamw" not in labels:
        labels.insert(0, "adamw")

    model = ParamSet(args.vocab, args.width, args.layers).to(device)
    if args.peers_only:
        for p, gr in zip(model.parameters(), _grads(model, device)):
            p.grad = gr
        _peer_section(model, args, device)
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    grads = _grads(model, device)
    opts = {}
    for lab in labels:
        opts[lab] = _make(lab, model, args)
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr
    initial = [p.detach().clone() for p in model.parameters()]
    for opt in opts.values():  # warm-up: allocate state, compile kernels
        for _ in range(3):
            opt.step()
    times: dict[str, list[float]] = {lab: [] for lab in labels}
    for _ in range(args.rounds):
        for lab in labels:
            times[lab].append(_time_steps(opts[lab], device, args.steps))
            with torch.no_grad():  # keep parameters from drifting far between optimizers
                for p, p0 in zip(model.parameters(), initial):
                    p.copy_(p0)
    base = statistics.median(times["adamw"])
    baseline_name = "fused" if device.type == "cuda" and args.baseline == "fused" else "foreach"
    print(f"device={device} params={n_params:,} width={args.width} layers={args.layers} vocab={args.vocab} "
          f"torch={torch.__version__}; baseline torch AdamW ({baseline_name}) = {base * 1e3:.3f} ms/step")
    print(f"{'optimizer':<22}{'ms/step':>10}{'ratio':>8}{'bar':>6}{'ok':>5}{'state B/param':>15}")
    for lab in labels:
        med = statistics.median([t / b for t, b in zip(times[lab], times["adamw"])])
        bar = BARS.get(lab)
        ok = "" if bar is None else ("yes" if med <= bar else "NO")
        bar_s = f"{bar:.1f}" if bar else "-"
        print(f"{lab:<22}{statistics.median(times[lab]) * 1e3:>10.3f}{med:>8.2f}{bar_s:>6}{ok:>5}"
              f"{_state_bytes(opts[lab]) / n_params:>15.3f}")
    if "sophia" in labels:
        fb, est = _estimator_cost(args, device)
        period = ROWS["sophia"].get("hparams", {}).get("update_period", 10)
        print(f"\nSophia-G estimator on the same-size GPT ({args.batch}x{args.seq} tokens): training step "
              f"{fb * 1e3:.2f} ms; one estimate adds {est * 1e3:.2f} ms ({est / fb:.2f}x), "
              f"amortized over update_period={period}: {est / period * 1e3:.2f} ms/step ({est / fb / period:.3f}x)")
    if not args.no_peers:
        _peer_section(model, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
