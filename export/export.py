"""`python -m export.export MODEL [--checkpoint PATH] [--repository DIR] [--version N]`: export a trained
checkpoint to the model repository, only if ONNX Runtime matches PyTorch on held-out images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.train import MODELS, RUNS
from service.settings import PROJECT_ROOT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.export", description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--checkpoint", type=Path, help="default runs/<model>/checkpoint.pt")
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--name", help="model name in the repository (default: the model kind)")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or RUNS / args.model / "checkpoint.pt"
    manifest = MODELS[args.model].export(
        checkpoint, args.repository, name=args.name or args.model, version=args.version
    )
    print(
        json.dumps(
            {
                "published": f"{args.repository}/{manifest.name}/{manifest.version}",
                "quality": manifest.quality,
                "parity": manifest.parity.model_dump(),
            }
        )
    )


if __name__ == "__main__":
    main()
