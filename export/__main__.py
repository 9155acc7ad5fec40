"""`python -m export MODEL [--seed N] [--epochs N] [--force]`: train, then export; reproduces a shipped
artifact from scratch (`--force` to replace it). On your own data:
`python -m export MODEL --data DIR --name NAME [--epochs N]` publishes under NAME, never over a
shipped model. The training and export CLIs also run alone: export.train, export.export."""

from __future__ import annotations

import argparse

from export import export, train
from export.onnx_export import ExportError, require_free


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    train.add_arguments(parser)
    export.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.data and not args.name:
        parser.error("--data needs --name: a model trained on your data is published under its own name")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = args.name or args.model
    try:  # refused before training, not after it
        require_free(args.repository, name, args.version, args.force)
    except ExportError as error:
        raise SystemExit(str(error)) from None
    args.checkpoint = args.checkpoint or train.RUNS / name / "checkpoint.pt"
    export.run(args, train.run(args))


if __name__ == "__main__":
    main()
