"""`python -m export.export MODEL [--checkpoint PATH] [--repository DIR] [--name NAME] [--version N] [--force]
[--fp16]`: export a trained checkpoint to the model repository, only if ONNX Runtime matches PyTorch on
held-out images; an existing version is refused without --force. With --fp16 the graphs are converted
to float16 (float32 inputs and outputs) and published only if they pass a quality gate against the
float32 graphs on held-out data (export/fp16.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.families import FAMILIES
from export.fp16 import export_fp16
from export.train import RUNS
from service.settings import PROJECT_ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where the artifact goes (shared with `python -m export`)."""
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--name", help="model name in the repository (default: the model kind)")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace an existing <name>/<version>")


def run(args: argparse.Namespace, checkpoint: Path) -> None:
    name, family = args.name or args.model, FAMILIES[args.model]
    options = family.export_options(args.repository)
    if getattr(args, "fp16", False):
        manifest = export_fp16(family, checkpoint, args.repository, name, args.version, args.force, **options)
    else:
        manifest = family.export(
            checkpoint, args.repository, name=name, version=args.version, force=args.force, **options
        )
    published = {"published": f"{args.repository}/{manifest.name}/{manifest.version}"}
    gate = {"fp16_gate": manifest.fp16_gate.model_dump()} if manifest.fp16_gate else {}
    print(json.dumps({**published, "quality": manifest.quality, "parity": manifest.parity.model_dump(), **gate}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.export", description=__doc__)
    parser.add_argument("model", choices=sorted(FAMILIES))
    parser.add_argument("--checkpoint", type=Path, help="default runs/<model>/checkpoint.pt")
    add_arguments(parser)
    parser.add_argument("--fp16", action="store_true", help="float16 graphs, gated on held-out quality")
    args = parser.parse_args(argv)
    run(args, args.checkpoint or RUNS / args.model / "checkpoint.pt")


if __name__ == "__main__":
    main()
