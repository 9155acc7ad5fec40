"""`python -m bench.hf [--seconds S] [--repeats N] [--concurrency C ...] [--json PATH]`: an imported
ViT-B/16 on JPEG photos, side by side in one run.

A ViT-B/16-sized `ViTForImageClassification` (random weights, 1,000 labels, 224x224, transformers'
ViT image processor) is saved as a Hugging Face folder and imported with `python -m export.hf`, as a
user would (once; kept under bench/.cache/). Then, in every repeat, taking turns:
- the service (a real uvicorn process) under C requests in flight, each one of scikit-learn's sample
  photos as a JPEG (640x427, quality 90) on /v1/classify: images/s, and the batch sizes it formed;
- raw ONNX Runtime (the service's session settings) running the same graph on exactly the batches
  the service formed, inputs ready in memory: the ceiling the service's images/s is held against
  (target: 90% of it);
- transformers' own `pipeline("image-classification")` on PyTorch over the same JPEG bytes, at the
  same batch sizes (decoding and preprocessing included, as for the service).
Figures are medians over repeats; client and servers share this machine's cores."""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

from bench.common import report
from bench.peers.load import load
from bench.peers.servers import raw
from bench.service import free_port
from service.runtime import create_session
from service.settings import PROJECT_ROOT, Settings

CACHE = PROJECT_ROOT / "bench" / ".cache" / "hf"
NAME = "vitb16"


def photos() -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    encoded = []
    for array in load_sample_images().images:
        for image in (Image.fromarray(array), Image.fromarray(array[:, ::-1])):  # and mirrored: 4 photos
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
    return encoded


def checkpoint(folder: Path) -> Path:
    """A ViT-B/16-sized random-weight checkpoint folder, as `save_pretrained` writes it."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(0)
    labels = {i: f"class {i}" for i in range(1000)}
    model = ViTForImageClassification(ViTConfig(id2label=labels, label2id={v: k for k, v in labels.items()}))
    model.save_pretrained(folder)
    ViTImageProcessorPil().save_pretrained(folder)  # 224x224 bilinear, mean and std 0.5
    return folder


def imported(folder: Path, repository: Path) -> Path:
    from export import hf

    if not (repository / NAME / "1" / "manifest.json").exists():
        started = time.perf_counter()
        hf.main([str(folder), "--name", NAME, "--repository", str(repository)])
        print(f"imported in {time.perf_counter() - started:.0f} s")
    return repository


@contextmanager
def server(repository: Path, **settings: str) -> Iterator[str]:
    """`python -m service` over the repository, once ready (loading and warming a ViT-B takes a while);
    `settings` as environment variables (VITSERVE_...)."""
    port = free_port()
    env = {**os.environ, "VITSERVE_LOG_LEVEL": "warning", "VITSERVE_MODEL_REPOSITORY": str(repository), **settings}
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx2.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def formed(url: str) -> Counter[int]:
    models = httpx2.get(f"{url}/v1/models", timeout=10).json()["models"]
    sizes = next(m for m in models if m["name"] == NAME)["batch_sizes"].get("main", {})
    return Counter({int(size): runs for size, runs in sizes.items()})


def ort_rate(session: Any, mix: Counter[int]) -> float:
    """Images/s of ONNX Runtime alone running exactly the batches the service ran (every run of every
    size, inputs ready): as long a run as the service's, through the same noise of shared cores."""
    feeds = {size: {"pixel_values": np.random.rand(size, 3, 224, 224).astype(np.float32)} for size in mix}
    for feed in feeds.values():
        session.run(None, feed)  # warm at this size
    started = time.perf_counter()
    for size, runs in mix.items():
        for _ in range(runs):
            session.run(None, feeds[size])
    return sum(size * runs for size, runs in mix.items()) / (time.perf_counter() - started)


def pipeline_rate(pipe: Any, jpegs: list[bytes], mix: Counter[int]) -> float:
    """Images/s of transformers' pipeline over the JPEG bytes (decoded by it) at the same batch sizes
    (one timed call per size, weighted by the service's runs: PyTorch is the slow one here)."""
    from PIL import Image

    seconds = 0.0
    for size, runs in mix.items():
        images = [Image.open(io.BytesIO(jpegs[i % len(jpegs)])) for i in range(size)]
        started = time.perf_counter()
        pipe(images, batch_size=size, top_k=5)
        seconds += (time.perf_counter() - started) * runs
    return sum(size * runs for size, runs in mix.items()) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hf", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each timed service run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path, default=Path("bench/results/hf.json"))
    args = parser.parse_args(argv)
    import torch
    from transformers import pipeline

    folder = checkpoint(CACHE / "checkpoint")
    repository = imported(folder, CACHE / "repository")
    session = create_session(repository / NAME / "1" / "model.onnx", Settings())
    pipe = pipeline("image-classification", model=str(folder), device="cpu")
    jpegs = photos()
    requests = [raw(f"/v1/classify?model={NAME}")(jpeg, "image/jpeg") for jpeg in jpegs]
    rates: dict[tuple[str, int], list[float]] = {}
    mixes: dict[int, Counter[int]] = {}
    for _ in range(args.repeats):
        with server(repository) as url:
            for concurrency in args.concurrency:  # the three take turns in every repeat
                load(url, requests, concurrency, 2.0, warmup=0)  # warm the connections
                before = formed(url)
                run = load(url, requests, concurrency, args.seconds, warmup=0)
                mix = formed(url) - before
                mixes.setdefault(concurrency, Counter()).update(mix)
                rates.setdefault(("service", concurrency), []).append(run.rate)
                rates.setdefault(("onnxruntime", concurrency), []).append(ort_rate(session, mix))
                rates.setdefault(("transformers", concurrency), []).append(pipeline_rate(pipe, jpegs, mix))
    rows = []
    for concurrency in args.concurrency:
        service, ort, hf = (statistics.median(rates[(who, concurrency)]) for who in ("service", "onnxruntime",
                                                                                     "transformers"))  # fmt: skip
        mix = mixes[concurrency]
        rows.append({
            "concurrency": concurrency,
            "batch sizes formed (size: runs)": ", ".join(f"{s}: {n}" for s, n in sorted(mix.items())),
            "service images/s": service,
            "raw onnxruntime images/s": ort,
            "transformers pipeline (PyTorch) images/s": hf,
            "service / onnxruntime": service / ort,
            "service / transformers": service / hf,
        })  # fmt: skip
    print(f"threads: torch {torch.get_num_threads()}; service and ORT at the service's session settings")
    report("hf", rows, args.json)


if __name__ == "__main__":
    main()
