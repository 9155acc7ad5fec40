"""`python -m export.train MODEL [--data DIR] [--epochs N] [--seed N] [--image-size N] [--channels 1|3]`:
train a model, save its checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.families import FAMILIES

RUNS = Path("runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(FAMILIES))
    data_help = "; ".join(f"{family.name}: {family.data_help}" for family in FAMILIES.values())
    parser.add_argument("--data", type=Path, help=data_help)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--epochs", type=int, help="override the default number of epochs")
    parser.add_argument("--image-size", type=int, help="model input side (default: from the data; vit, detr)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 grey, 3 RGB (default: from the data)")
    parser.add_argument("--checkpoint", type=Path, help="where to save (default runs/<model>/checkpoint.pt)")


def run(args: argparse.Namespace) -> Path:
    """Train as `args` say; returns the checkpoint's path."""
    family = FAMILIES[args.model]
    out: Path = args.checkpoint or RUNS / args.model / "checkpoint.pt"
    cfg = family.train_config(seed=args.seed)
    if args.epochs:
        cfg.epochs = args.epochs
    source = family.source(args.data, args.seed)
    checkpoint = family.train(source, out, cfg=cfg, image_size=args.image_size, channels=args.channels)
    print(json.dumps({"checkpoint": str(out), "quality": checkpoint["quality"], "training": checkpoint["training"]}))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m export.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
