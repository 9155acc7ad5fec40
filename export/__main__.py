"""`python -m export MODEL [--data DIR] [--seed N] [--epochs N]`: train, then export — reproduces a shipped artifact
from scratch (the training and export CLIs also run alone: export.train, export.export)."""

from __future__ import annotations

import sys

from export import export, train


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    checkpoint = train.main(argv)
    export.main([argv[0], "--checkpoint", str(checkpoint)])


if __name__ == "__main__":
    main()
