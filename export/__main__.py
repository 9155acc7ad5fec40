"""`python -m export MODEL [--seed N] [--epochs N] [--force]`: train, then export; reproduces a shipped
artifact from scratch (`--force` to replace it). On your own data:
`python -m export MODEL --data DIR --name NAME [--epochs N]` publishes under NAME, never over a
shipped model; `python -m export vit --from HF_DIR --data DIR --name NAME` fine-tunes a transformers
classification checkpoint folder on it instead (export/finetune.py). The training and export CLIs
also run alone: export.train, export.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from export import export, finetune, train
from export.onnx_export import ExportError, require_free


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    train.add_arguments(parser)
    export.add_arguments(parser)
    parser.add_argument("--from", dest="start", type=Path, metavar="DIR",
                        help="vit: fine-tune this transformers classification checkpoint folder on --data")  # fmt: skip
    args = parser.parse_args(argv)
    if args.data and not args.name:
        parser.error("--data needs --name: a model trained on your data is published under its own name")
    if args.start:
        refuse_with_from(parser, args)
    return args


def refuse_with_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--from` fine-tunes a ViT-family classifier on the user's images; what does not fit that is refused."""
    if args.model != "vit":
        parser.error(f"--from fine-tunes a ViT-family classifier: `python -m export vit --from ...`, not {args.model}")
    if not args.data:
        parser.error("--from needs --data: the ImageFolder (DIR/<class>/<image>) to fine-tune on")
    if args.image_size or args.channels:
        parser.error("--from takes its input size and channels from the checkpoint's image processor")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = args.name or args.model
    try:  # refused before training, not after it
        require_free(args.repository, name, args.version, args.force)
    except ExportError as error:
        raise SystemExit(str(error)) from None
    if args.start:
        finetune.main(args)
        return
    args.checkpoint = args.checkpoint or train.RUNS / name / "checkpoint.pt"
    export.run(args, train.run(args))


if __name__ == "__main__":
    main()
