"""`python -m export.export MODEL [--checkpoint PATH] [--repository DIR] [--name NAME] [--version N] [--force]`:
export a trained checkpoint to the model repository, only if ONNX Runtime matches PyTorch on held-out
images; an existing version is refused without --force."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.train import MODELS, RUNS
from service.settings import PROJECT_ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where the artifact goes (shared with `python -m export`)."""
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--name", help="model name in the repository (default: the model kind)")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace an existing <name>/<version>")


def run(args: argparse.Namespace, checkpoint: Path) -> None:
    manifest = MODELS[args.model].export(
        checkpoint, args.repository, name=args.name or args.model, version=args.version, force=args.force
    )
    published = {"published": f"{args.repository}/{manifest.name}/{manifest.version}"}
    print(json.dumps({**published, "quality": manifest.quality, "parity": manifest.parity.model_dump()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.export", description=__doc__)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--checkpoint", type=Path, help="default runs/<model>/checkpoint.pt")
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args, args.checkpoint or RUNS / args.model / "checkpoint.pt")


if __name__ == "__main__":
    main()
