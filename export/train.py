"""`python -m export.train vit [--data DIR] [--epochs N]`: train a model and save its checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from export import vit

RUNS = Path("runs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.train", description=__doc__)
    parser.add_argument("model", choices=["vit"])
    parser.add_argument("--data", type=Path, help="an ImageFolder (one sub-folder per class); default: digits")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--epochs", type=int, help="override the default number of epochs")
    parser.add_argument("--checkpoint", type=Path, help="where to save (default runs/<model>/checkpoint.pt)")
    return parser.parse_args(argv)


def source_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.data:
        return {"kind": "folder", "path": str(args.data.resolve()), "seed": args.seed}
    return {"kind": "digits", "seed": args.seed}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = args.checkpoint or RUNS / args.model / "checkpoint.pt"
    cfg = vit.TrainConfig(seed=args.seed, invert_prob=0.0 if args.data else 0.5)
    if args.epochs:
        cfg.epochs = args.epochs
    checkpoint = vit.train(source_of(args), out, cfg=cfg)
    print(json.dumps({"checkpoint": str(out), "quality": checkpoint["quality"], "training": checkpoint["training"]}))
    return out


if __name__ == "__main__":
    main()
