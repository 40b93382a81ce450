"""``optlab eval``: zero-shot accuracy of a saved checkpoint; ``optlab eval prepare``: offline task files.

    optlab eval --ckpt runs/last.ckpt --tasks arc_easy,arc_challenge,hellaswag,mmlu --task-dir tasks/
    optlab eval prepare --arc ARC-V1-Feb2018 --hellaswag hellaswag/ --mmlu mmlu/data --out tasks/
    optlab eval prepare --samples --out tasks/     # the small sample files shipped with the package

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no
pickled code runs. A checkpoint that needs more is refused with the reason; ``--trust-checkpoint``
loads it fully (only for files you trust). No Lightning import: the model is rebuilt from the
checkpoint's ``hyper_parameters["model"]`` (a preset name or config mapping, as
:class:`~lightning_optlab.lit.CausalLMModule` saves it) and its ``state_dict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint

__all__ = ["main", "load_checkpoint_model", "find_tokenizer"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlab eval",
                                     description="zero-shot evaluation of a checkpoint with lm-eval")
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of CausalLMModule")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,mmlu",
                        help="comma-separated lm-eval tasks (default: the four of the budget study)")
    parser.add_argument("--task-dir", default=None,
                        help="folder from `optlab eval prepare` (offline); 'samples' for the shipped samples; "
                             "omitted: lm-eval's built-in tasks from the Hugging Face hub")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or 'bytes' (default: the tokenizer.json found beside the checkpoint)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (quick checks)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="context length if the model config has none")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load with full unpickling (runs code stored in the file: only for files you trust)")
    return parser


def _prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlab eval prepare",
                                     description="turn local ARC / HellaSwag / MMLU files into lm-eval task YAMLs")
    parser.add_argument("--out", required=True, help="folder to write (pass it as --task-dir / task_dir=)")
    parser.add_argument("--arc", default=None, help="the AI2 ARC-V1-Feb2018 folder (or one *-Test.jsonl)")
    parser.add_argument("--hellaswag", default=None, help="folder with hellaswag_val.jsonl (or the file)")
    parser.add_argument("--mmlu", default=None, help="MMLU's data/ folder (test/ and dev/ CSVs)")
    parser.add_argument("--samples", action="store_true", help="use the small sample files shipped with the package")
    return parser


def _load(path: Path, trust: bool) -> dict[str, Any]:
    # damaged, empty, not a checkpoint, or holding code (only then --trust-checkpoint): see checkpoint.py
    ckpt = load_checkpoint(path, trust=trust, trust_hint="--trust-checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a dict)",
                              path=path, kind="not-torch")
    return ckpt


def load_checkpoint_model(path: str | Path, *, trust: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a ``CausalLMModule`` checkpoint; returns ``(model, checkpoint)``."""
    from ..models import build_model

    ckpt = _load(Path(path), trust)
    spec = (ckpt.get("hyper_parameters") or {}).get("model")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no state_dict: is it a Lightning checkpoint?", path=Path(path),
                              kind="not-torch")
    if not isinstance(spec, (str, dict)):
        raise CheckpointError(f"{path} does not say which model it holds (hyper_parameters['model'] is "
                              f"{type(spec).__name__}); CausalLMModule records it when built from a preset name or "
                              "config mapping — a module built from an nn.Module instance cannot be rebuilt here",
                              path=Path(path), kind="not-torch")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    overrides = {}
    for key, value in weights.items():  # the vocabulary came from the datamodule: read it off the embedding
        if key.endswith(("wte.weight", "tok_embeddings.weight", "embed_tokens.weight", "embedding.weight")):
            overrides["vocab_size"] = value.shape[0]
            break
    model = build_model(spec, **overrides)
    model.load_state_dict(weights)
    return model.eval(), ckpt


def find_tokenizer(ckpt: Path) -> Path:
    """The ``tokenizer.json`` LMDataModule wrote beside the run: the checkpoint's folder or up to 3 above."""
    for folder in [ckpt.parent, *list(ckpt.parents)[1:4]]:
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise FileNotFoundError(f"no tokenizer.json beside {ckpt} (nor in the 3 folders above it): pass --tokenizer "
                            "PATH (or 'bytes' for the byte tokenizer)")


def _prepare(argv: list[str]) -> int:
    from .tasks import prepare_samples, prepare_tasks

    args = _prepare_parser().parse_args(argv)
    try:
        names = prepare_samples(args.out) if args.samples else prepare_tasks(
            args.out, arc=args.arc, hellaswag=args.hellaswag, mmlu=args.mmlu)
    except (ValueError, FileNotFoundError) as err:
        print(f"optlab eval prepare: {err}", file=sys.stderr)
        return 2
    print(f"wrote tasks {', '.join(names)} to {args.out}; evaluate with --task-dir {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``optlab eval ...``; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        return _prepare(argv[1:])
    args = _parser().parse_args(argv)
    from .tasks import prepare_samples

    tasks = [t for t in args.tasks.split(",") if t]
    ckpt = Path(args.ckpt)
    with tempfile.TemporaryDirectory(prefix="optlab_sample_tasks_") as scratch:
        task_dir = args.task_dir
        if task_dir == "samples":
            task_dir = scratch
            prepare_samples(task_dir)
        return _evaluate(args, tasks, ckpt, task_dir)


def _evaluate(args: argparse.Namespace, tasks: list[str], ckpt: Path, task_dir: str | None) -> int:
    from ..data.tokenizer import load_tokenizer
    from .adapter import ModuleLM
    from .run import HubUnreachableError, format_table, metrics_from_results, run_tasks, write_results

    try:
        model, _ = load_checkpoint_model(ckpt, trust=args.trust_checkpoint)
        tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(ckpt))
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        lm = ModuleLM(model.to(args.device), tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        results = run_tasks(lm, tasks, task_dir=task_dir, limit=limit, num_fewshot=args.num_fewshot)
    except (CheckpointError, FileNotFoundError, ValueError, HubUnreachableError) as err:
        print(f"optlab eval: {err}", file=sys.stderr)
        return 2
    metrics = metrics_from_results(results, tasks)
    if args.task_dir != "samples":  # say where the datasets library wrote its cache of the task data
        import os

        from .run import _cache_dir

        where = _cache_dir(task_dir, None) or os.environ.get("HF_DATASETS_CACHE") or "the Hugging Face datasets cache"
        print(f"task data cache: {where}")
    print(format_table({ckpt.name: metrics}, tasks))
    if args.output:
        write_results(results, args.output)
        print(f"results: {args.output}")
    else:
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
