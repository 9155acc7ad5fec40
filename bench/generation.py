"""`python -m bench.generation [--repeats N] [--json PATH] [--pool-only]`: sampling with the key/value cache (one
step-graph run per pixel) against full recomputation (the whole prefix through the scoring graph
for every pixel), images per second at num_images 1 and 16, same sampler, same model; then the
real service answering 8 concurrent single-image requests, with their decoding steps batched
together and without; then the service's two caches, in the device's pool (the pooled step graph)
and on the host, in one process taking turns, at several shapes of load (on a CPU, where there is
no bus to spare, this is the pool's overhead; bench.gpu measures it on a GPU)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx2
import numpy as np
import onnxruntime as ort

from bench.common import interleaved, report
from bench.service import server
from service.manifest import GenerationConfig, read_manifest
from service.repository import ServedModel, load_model
from service.sampling import choose, finished, sample, sample_rows
from service.settings import PROJECT_ROOT, Settings
from service.tasks import TASKS, manifest_checks

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
    return sample(step, cfg, labels, seed).reshape(len(labels), -1)


async def concurrent_generation(url: str, concurrency: int, seconds: float) -> float:
    """Images/s of the service answering `concurrency` single-image /v1/generate requests at once."""
    done = 0
    deadline = time.perf_counter() + seconds
    async with httpx2.AsyncClient(base_url=url, timeout=60) as client:

        async def worker(offset: int) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                body = {"label": str(offset % 10), "seed": done, "scale": 1}
                assert (await client.post("/v1/generate", json=body)).status_code == 200
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return done / (time.perf_counter() - started)


def service_rows(concurrency: int, seconds: float, repeats: int) -> list[dict[str, object]]:
    """Concurrent requests share decoding steps through the batcher, or (batching off) each runs alone."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeats):
        for mode in rates:
            with server(["-m", "service"], {"VITSERVE_BATCHING": "true" if mode == "on" else "false"}) as url:
                asyncio.run(concurrent_generation(url, concurrency, 0.5))
                rates[mode].append(asyncio.run(concurrent_generation(url, concurrency, seconds)))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return [{"service, concurrent requests": concurrency, "step batching on images/s": on,
             "step batching off images/s": off, "ratio": on / off}]  # fmt: skip


async def generations(model: ServedModel, cfg: GenerationConfig, num_images: int, concurrency: int) -> float:
    """Seconds for `concurrency` generations of `num_images` at once, through the model's batcher."""

    async def one(seed: int) -> None:
        decoding = model.decoding(cfg, num_images)
        try:
            labels = np.full(num_images, seed % cfg.num_classes)
            await finished(sample_rows(decoding.step, cfg, labels, np.random.default_rng(seed)))
        finally:
            decoding.release()

    started = time.perf_counter()
    await asyncio.gather(*(one(seed) for seed in range(concurrency)))
    return time.perf_counter() - started


def pool_rows(repeats: int) -> list[dict[str, object]]:
    """The cache pool against the host cache, same model, turns taken, medians."""
    models = {
        mode: load_model(MODEL.parent, Settings(device_cache=mode), manifest_checks(TASKS)) for mode in ("on", "off")
    }
    cfg = GenerationConfig.model_validate(read_manifest(MODEL).config)
    rows: list[dict[str, object]] = []

    async def measure() -> None:
        for num_images, concurrency in ((1, 1), (64, 1), (1, 16), (8, 8)):
            seconds: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(repeats):
                for mode, model in models.items():
                    seconds[mode].append(await generations(model, cfg, num_images, concurrency))
            pool, host = (statistics.median(seconds[m]) for m in ("on", "off"))
            images = num_images * concurrency
            rows.append({"num_images": num_images, "concurrent requests": concurrency, "pool images/s": images / pool,
                         "host cache images/s": images / host, "pool / host": host / pool})  # fmt: skip

    asyncio.run(measure())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each timed service run")
    parser.add_argument("--json", type=Path, default=Path("bench/results/generation.json"))
    parser.add_argument("--pool-only", action="store_true", help="only the cache pool against the host cache")
    args = parser.parse_args(argv)
    if args.pool_only:
        report("generation_pool", pool_rows(args.repeats), args.json.with_name("generation_pool.json"))
        return
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
    print()
    report("generation_service", service_rows(8, args.seconds, 3), args.json.with_name("generation_service.json"))
    print()
    report("generation_pool", pool_rows(args.repeats), args.json.with_name("generation_pool.json"))


if __name__ == "__main__":
    main()
