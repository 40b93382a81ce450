"""Token shards vs the streaming path: prepare speed, loader speed, resume time; one run, a ratio table.

On the embedded corpus ``embedded:all`` (CPython's docs and its standard library's sources) with
the demo's tokenizer settings (byte-level BPE, vocabulary 1024, trained on the training split):

* prepare: tokens/s of ``optlab data prepare`` with 1 and 2 worker processes (per worker);
* loader: tokens/s of the token-shard loader and of the streaming packer (read, tokenize, pack),
  against the tokens/s a training step of the demo model (llama-tiny, batch 8 x 128) consumes;
* resume: seconds from building the training stream at a position to its first batch, after 1M
  and 100M consumed tokens (the streaming path re-tokenizes what was consumed: it is measured at
  1M and 4M tokens and its 100M figure is extrapolated linearly, labelled "est.").

    python benchmarks/data_throughput.py [--out optlab_runs/bench_data] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_optlab import OptimizerSpec, configure
from lightning_optlab.data import EMBEDDED_SETS, DataConfig, DataPipeline, PrepareConfig, embedded_records, prepare
from lightning_optlab.models import build_model

BATCH, SEQ = 8, 128


def _train_bpe(work: Path, quick: bool) -> Path:
    pipe = DataPipeline(DataConfig(data="embedded:all", tokenizer="bpe", vocab_size=1024, val_batches=0,
                                   bpe_train_chars=2_000_000 if quick else 20_000_000, work_dir=str(work)))
    pipe.prepare()
    return pipe.bpe_path()


def bench_prepare(work: Path, tok: Path, workers: int) -> tuple[float, dict]:
    out = work / f"shards-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    index = prepare(PrepareConfig(inputs=["embedded:all"], out=str(out), tokenizer=str(tok), val_fraction=0.0,
                                  workers=workers, work_dir=str(work), progress=False))
    return time.perf_counter() - t0, index


def _loader_rate(pipe: DataPipeline, n: int) -> float:
    it = iter(pipe.loader(pipe.train_dataset()))
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * BATCH * SEQ / (time.perf_counter() - t0)


def _resume_seconds(pipe: DataPipeline, tokens: int) -> float:
    k = tokens // (BATCH * (SEQ + 1))
    t0 = time.perf_counter()
    batch = next(iter(DataLoader(pipe.train_dataset(k), batch_size=None)))
    assert batch.shape == (BATCH, SEQ + 1)
    return time.perf_counter() - t0


def train_step_rate(vocab: int, steps: int = 10) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=vocab)
    opt = configure(model, OptimizerSpec(name="adamw", lr=1e-3))["optimizer"]
    batch = torch.randint(0, vocab, (BATCH, SEQ + 1))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return BATCH * SEQ / statistics.median(times[2:]), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="optlab_runs/bench_data")
    parser.add_argument("--quick", action="store_true", help="smaller BPE training text (faster, for a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out)
    tok = _train_bpe(work, args.quick)
    t1, index = bench_prepare(work, tok, 1)
    t2, _ = bench_prepare(work, tok, 2)
    tokens = index["splits"]["train"]["tokens"]
    chars = sum(len(r["text"]) for name in EMBEDDED_SETS for r in embedded_records(name))
    shards = DataPipeline(DataConfig(data=str(work / "shards-w1"), seq_len=SEQ, batch_size=BATCH, val_batches=0))
    stream = DataPipeline(DataConfig(data="embedded:all", tokenizer=str(tok), seq_len=SEQ, batch_size=BATCH,
                                     val_fraction=0.0, val_batches=0, work_dir=str(work)))
    shards.setup()
    stream.setup()
    step_rate, params = train_step_rate(shards.vocab_size)
    shard_rate, stream_rate = _loader_rate(shards, 400), _loader_rate(stream, 100)
    r_sh = {n: min(_resume_seconds(shards, n) for _ in range(3)) for n in (10**6, 10**8)}
    r_st1, r_st4 = _resume_seconds(stream, 10**6), _resume_seconds(stream, 4 * 10**6)
    r_st100 = r_st4 + (r_st4 - r_st1) / 3e6 * 96e6

    print(f"(2 CPU cores shared with other work: the 2-worker figure is a lower bound)")
    print(f"corpus embedded:all: {index['read']['documents']:,} documents, {chars:,} characters, {tokens:,} tokens "
          f"(BPE 1024), CPython {index['python']}; llama-tiny at vocab 1024: {params:,} parameters = "
          f"{tokens / params:.1f} tokens/parameter per epoch")
    rows = [
        ("prepare, 1 worker (tokens/s)", tokens / t1, None, "per worker"),
        ("prepare, 2 workers (tokens/s per worker)", tokens / t2 / 2, tokens / t1, "vs 1 worker"),
        ("demo training step consumes (tokens/s)", step_rate, None, "llama-tiny, 8 x 128, AdamW, 1 thread"),
        ("streaming loader (tokens/s)", stream_rate, step_rate, "vs training step"),
        ("token-shard loader (tokens/s)", shard_rate, step_rate, "vs training step"),
        ("token-shard loader vs streaming", shard_rate, stream_rate, "speed-up"),
        ("resume after 1M tokens, streaming (s)", r_st1, None, ""),
        ("resume after 100M tokens, streaming (s)", r_st100, r_st1, "est. (linear from 1M, 4M), vs 1M"),
        ("resume after 1M tokens, token shards (s)", r_sh[10**6], r_st1, "vs streaming"),
        ("resume after 100M tokens, token shards (s)", r_sh[10**8], r_sh[10**6], "vs 1M (flat = 1.0)"),
    ]
    print(f"\n| measurement | value | ratio | against |\n|---|---:|---:|---|")
    for name, value, base, note in rows:
        ratio = f"{value / base:.2f}" if base else ""
        shown = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        print(f"| {name} | {shown} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
