"""``optlab data``: prepare token shards once, and show what a prepared directory holds.

* ``optlab data prepare SRC... --tokenizer T --out DIR [--workers N] [--sources SET ...]``
* ``optlab data info DIR``
"""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlab data", description="tokenize text once into memory-mapped token "
                                     "shards (docs/data.md), and inspect them")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize SRC... into token shards under --out (resumable)")
    p.add_argument("inputs", nargs="+", metavar="SRC", help="shard files, directories, globs (SlimPajama .jsonl.zst, "
                   "C4 .json.gz, JSONL), 'embedded', 'embedded:all', 'embedded:CPythonSource', or one "
                   "'hub:<owner>/<name>' (with --allow-download)")
    p.add_argument("--tokenizer", required=True, help="'bytes', 'bpe' (trained here on the training split) or the "
                   "path of a tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (an interrupted prepare into it is continued)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--sources", nargs="+", default=None, help="keep only these meta.redpajama_set_name values")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out by text hash "
                   "(default 0.05; 0 for a folder that is itself the validation data)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of --tokenizer bpe (default 4096)")
    p.add_argument("--bpe-train-chars", type=int, default=20_000_000, help="characters the BPE learns from")
    p.add_argument("--eos-token", default="<|endoftext|>", help="end-of-document token of a tokenizer file")
    p.add_argument("--allow-download", action="store_true", help="permit a hub:... input (streams over the network)")
    p.add_argument("--hub-split", default="train", help="split of the hub data set (default train)")
    p.add_argument("--hub-docs-per-shard", type=int, default=50_000, help="documents per shard of a hub stream")
    p.add_argument("--work-dir", default="optlab_runs/data", help="where the embedded corpora are written first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="summarize a prepared directory (and check its shards)")
    i.add_argument("directory")
    return parser


def _prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from .prepare import PrepareConfig, prepare

    try:
        cfg = PrepareConfig(inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, eos_token=args.eos_token,
                            vocab_size=args.vocab_size, bpe_train_chars=args.bpe_train_chars, sources=args.sources,
                            val_fraction=args.val_fraction, workers=args.workers, allow_download=args.allow_download,
                            hub_split=args.hub_split, hub_docs_per_shard=args.hub_docs_per_shard,
                            work_dir=args.work_dir, progress=not args.no_progress,
                            command=shlex.join(["optlab", "data", *argv]))
        index = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"optlab data prepare: {err}", file=sys.stderr)
        return 2
    print(_summary(args.out, index))
    return 0


def _summary(directory: str, index: dict) -> str:
    lines = [f"{directory}: {index['dtype']} ids, vocabulary {index['vocab_size']:,}, eos id {index['eos_id']}"
             + (f", CPython {index['python']}" if index.get("python") else "")]
    for split, s in index["splits"].items():
        lines.append(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shards")
    r = index["read"]
    lines.append(f"  read: {r.get('files', 0)} files, {r.get('filtered', 0)} filtered by source set, "
                 f"{r.get('empty', 0)} empty, {r.get('corrupt_lines', 0)} corrupt records skipped, "
                 f"{r.get('bad_shards', 0)} undecodable shards; source sets seen: {r.get('sources_seen', {})}")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from .shards import TokenShards

    try:
        shards = TokenShards(args.directory, "all")  # opening checks every shard
    except (ValueError, FileNotFoundError) as err:
        print(f"optlab data info: {err}", file=sys.stderr)
        return 2
    print(_summary(args.directory, shards.index))
    print(f"  prepared by: {shards.index.get('command')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args, argv)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
