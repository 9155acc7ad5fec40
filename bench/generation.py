"""`python -m bench.generation [--repeats N] [--json PATH]`: sampling with the key/value cache (one
step-graph run per pixel) against full recomputation (the whole prefix through the scoring graph
for every pixel), images per second at num_images 1 and 16, same sampler, same model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import interleaved, report
from service.manifest import read_manifest
from service.sampling import GenerationConfig, choose, sample_rows
from service.settings import PROJECT_ROOT

MODEL = PROJECT_ROOT / "model_repository" / "imagetransformer" / "1"


def full_recomputation(score: ort.InferenceSession, cfg: GenerationConfig, labels: np.ndarray, seed: int) -> np.ndarray:
    """Sampling without a cache: every pixel re-runs the full-sequence graph over the image so far."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((len(labels), cfg.length), dtype=np.int64)
    for t in range(cfg.length):
        logits, _ = score.run(None, {"pixels": pixels, "labels": labels})
        pixels[:, t] = choose(logits[:, t], rng, 1.0, None)
    return pixels


def cached(step: ort.InferenceSession, cfg: GenerationConfig, labels: np.ndarray, seed: int) -> np.ndarray:
    *_, (_, images) = sample_rows(step, cfg, labels, np.random.default_rng(seed))
    return images.reshape(len(labels), -1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench/results/generation.json"))
    args = parser.parse_args(argv)
    manifest = read_manifest(MODEL)
    cfg = GenerationConfig.model_validate(manifest.config)
    score, step = (ort.InferenceSession(str(MODEL / manifest.graphs[g].file), providers=["CPUExecutionProvider"])
                   for g in ("main", "step"))  # fmt: skip
    rows = []
    for batch in (1, 16):
        labels = np.arange(batch, dtype=np.int64) % cfg.num_classes
        # same seed, same sampler: the two must draw the same images
        np.testing.assert_array_equal(cached(step, cfg, labels, 0), full_recomputation(score, cfg, labels, 0))
        seconds = interleaved(
            {
                "cached": lambda labels=labels: cached(step, cfg, labels, 0),
                "full": lambda labels=labels: full_recomputation(score, cfg, labels, 0),
            },
            args.repeats,
        )
        rows.append({
            "num_images": batch,
            "cached images/s": batch / seconds["cached"],
            "full recomputation images/s": batch / seconds["full"],
            "speed-up": seconds["full"] / seconds["cached"],
        })  # fmt: skip
    report("generation", rows, args.json)


if __name__ == "__main__":
    main()
