"""`python -m export.reproduce MODEL [--name NAME] [--version N] [--repository DIR] [--tolerance T]`:
retrain a published model from its manifest (data source, model and training configs, seed and thread
count) and compare the held-out figures with the manifest's. Exits 1 if any differs by more than T."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from export.families import FAMILIES
from export.family import TrainedFamily
from service.manifest import Manifest, read_manifest
from service.settings import PROJECT_ROOT

# absolute: about 4 of the 360 held-out digits, or a hundredth of a bit per pixel
TOLERANCE = 0.01


def train_config(family: TrainedFamily, manifest: Manifest) -> Any:
    """The train config the manifest records (beside it: epochs, threads and maybe seconds)."""
    fields = {f.name for f in dataclasses.fields(family.train_config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest.training.items() if k in fields}
    return family.train_config(**values)


def compare(recorded: dict[str, float], measured: dict[str, float], tolerance: float) -> list[dict[str, Any]]:
    """One row per figure the retrain measured that the manifest also records."""
    return [
        {"figure": k, "manifest": recorded[k], "retrained": v, "within": abs(v - recorded[k]) <= tolerance}
        for k, v in measured.items()
        if k in recorded
    ]


def retrain(family: TrainedFamily, manifest: Manifest, threads: int) -> dict[str, float]:
    """The held-out figures of a fresh training run as the manifest describes it, on `threads` threads."""
    model_cfg, cfg = family.model_config(**manifest.config), train_config(family, manifest)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
            checkpoint = family.train(manifest.data["source"], Path(tmp) / "checkpoint.pt", model_cfg, cfg)
    finally:
        torch.set_num_threads(before)
    quality: dict[str, float] = checkpoint["quality"]
    return quality


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m export.reproduce", description=__doc__)
    parser.add_argument("model", choices=sorted(FAMILIES))
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--name", help="default: the model kind")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--threads", type=int, help="default: the manifest's (bit-for-bit needs the same)")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.repository / (args.name or args.model) / str(args.version))
    threads = args.threads or manifest.training.get("threads") or torch.get_num_threads()
    quality = retrain(FAMILIES[args.model], manifest, threads)
    rows = compare(manifest.quality, quality, args.tolerance)
    print(json.dumps({"threads": threads, "tolerance": args.tolerance, "figures": rows}, indent=1))
    if not rows or not all(row["within"] for row in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
