"""`python -m export.train MODEL [--data DIR] [--epochs N] [--seed N] [--image-size N] [--channels 1|3]`:
train a model, save its checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

from export import detr, image_transformer, vit

RUNS = Path("runs")
# each module has source(), TrainConfig, train() and export()
MODELS: dict[str, ModuleType] = {"vit": vit, "detr": detr, "imagetransformer": image_transformer}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument(
        "--data",
        type=Path,
        help="vit: an ImageFolder (DIR/<class>/<image>), default digits; "
        "detr: DIR/{train,held_out}/annotations.json (COCO), default generated digit scenes",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--epochs", type=int, help="override the default number of epochs")
    parser.add_argument("--image-size", type=int, help="model input side (default: from the data; vit, detr)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 grey, 3 RGB (default: from the data)")
    parser.add_argument("--checkpoint", type=Path, help="where to save (default runs/<model>/checkpoint.pt)")


def run(args: argparse.Namespace) -> Path:
    """Train as `args` say; returns the checkpoint's path."""
    module = MODELS[args.model]
    out = args.checkpoint or RUNS / args.model / "checkpoint.pt"
    cfg = module.TrainConfig(seed=args.seed)
    if args.epochs:
        cfg.epochs = args.epochs
    shape = {"image_size": args.image_size, "channels": args.channels}
    checkpoint = module.train(module.source(args.data, args.seed), out, cfg=cfg, **shape)
    print(json.dumps({"checkpoint": str(out), "quality": checkpoint["quality"], "training": checkpoint["training"]}))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m export.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
