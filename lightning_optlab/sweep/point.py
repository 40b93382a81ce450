"""``python -m lightning_optlab.sweep.point POINT_DIR``: run one sweep point (the local executor's worker)."""

from __future__ import annotations

import sys

from .runner import run_point


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m lightning_optlab.sweep.point POINT_DIR", file=sys.stderr)
        return 2
    result = run_point(argv[0])
    print(f"{result['point']}: {result['status']} (final val loss {result['final_val_loss']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
