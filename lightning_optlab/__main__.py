"""``python -m lightning_optlab ...``: the ``optlab`` command (also ``python -m lightning_optlab.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
