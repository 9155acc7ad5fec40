"""`python -m bench.realsize [--workdir DIR] [--models dinov2-small yolos-tiny]`: imports at real size.

Random-weight checkpoints in the configurations of hub models (built here with transformers' classes:
nothing is downloaded), each imported with `python -m export.hf` (time and peak resident memory),
then served together by `python -m service` and compared with transformers' pipelines of the same
folders on the sample photos: labels in order, largest score and box differences, time a request."""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2

from service.settings import PROJECT_ROOT
from tests.e2e.conftest import free_port

LABELS = {i: f"class {i}" for i in range(1000)}


def _labels(n: int) -> dict[str, Any]:
    names = {i: LABELS[i] for i in range(n)}
    return {"id2label": names, "label2id": {v: k for k, v in names.items()}}


def dinov2_small(folder: Path) -> str:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2ForImageClassification

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
                       **_labels(1000))  # fmt: skip
    Dinov2ForImageClassification(cfg).save_pretrained(folder)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                     resample=3, image_mean=mean, image_std=std)  # fmt: skip
    processor.save_pretrained(folder)
    return "image-classification"


def yolos_tiny(folder: Path) -> str:
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessorPil

    cfg = YolosConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                      image_size=[800, 1333], num_detection_tokens=100, use_mid_position_embeddings=False,
                      **_labels(91))  # fmt: skip
    YolosForObjectDetection(cfg).save_pretrained(folder)
    YolosImageProcessorPil(size={"shortest_edge": 512, "longest_edge": 864}).save_pretrained(folder)
    return "object-detection"


MAKERS: dict[str, Callable[[Path], str]] = {"dinov2-small": dinov2_small, "yolos-tiny": yolos_tiny}


def imported(name: str, folder: Path, repository: Path) -> dict[str, Any]:
    started = time.monotonic()
    command = [sys.executable, "-m", "export.hf", str(folder), "--name", name, "--repository", str(repository),
               "--force"]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: import failed: {done.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB; the largest child so far
    return {"model": name, "import_s": round(time.monotonic() - started, 1), "peak_gib_so_far": round(peak, 1)}


def compared(url: str, name: str, task: str, folder: Path) -> dict[str, Any]:
    from transformers import pipeline

    from export.hf import sample_photos

    reference = pipeline(task, model=str(folder), device="cpu")
    route = "classify" if task == "image-classification" else "detect"
    query = "top_k=5" if route == "classify" else "threshold=0&max_detections=100"
    score, box, seconds = 0.0, 0.0, []
    for photo in sample_photos():
        png = io.BytesIO()
        photo.save(png, "PNG")
        started = time.perf_counter()
        answer = httpx2.post(f"{url}/v1/{route}?model={name}&{query}", content=png.getvalue(),
                             headers={"content-type": "image/png"}, timeout=300)  # fmt: skip
        seconds.append(time.perf_counter() - started)
        ours = answer.json()["results"][0]
        theirs = reference(photo, top_k=5) if route == "classify" else reference(photo, threshold=0.0)
        ours, theirs = (sorted(x, key=lambda d: -d["score"])[:20] for x in (ours, theirs))
        assert [d["label"] for d in ours] == [d["label"] for d in theirs], (ours, theirs)
        score = max(score, *(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs, strict=True)))
        if route == "detect":
            box = max(
                box, *(abs(a["box"][k] - b["box"][k]) for a, b in zip(ours, theirs, strict=True) for k in a["box"])
            )
    return {"model": name, "max_score_diff": score, "max_box_diff_px": box,
            "median_request_s": round(sorted(seconds)[len(seconds) // 2], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vitserve-realsize"))
    parser.add_argument("--models", nargs="+", choices=list(MAKERS), default=list(MAKERS))
    args = parser.parse_args(argv)
    repository, tasks = args.workdir / "repository", {}
    for name in args.models:
        folder = args.workdir / name
        if not (folder / "config.json").is_file():
            tasks[name] = MAKERS[name](folder)
        else:
            tasks[name] = "image-classification" if "dinov2" in name else "object-detection"
        print(imported(name, folder, repository), flush=True)
    port = free_port()
    env = {**os.environ, "VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_GRPC_PORT": "0"}
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while not _ready(url):
            if server.poll() is not None:
                raise SystemExit("the service exited before it was ready")
            time.sleep(0.2)
        print({"ready_s": round(time.monotonic() - started, 1)}, flush=True)
        for name in args.models:
            print(compared(url, name, tasks[name], args.workdir / name), flush=True)
    finally:
        server.terminate()
        server.wait()


def _ready(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx2.TransportError:
        return False


if __name__ == "__main__":
    main()
