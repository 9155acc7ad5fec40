"""`python -m bench.gpu [--device cuda|cpu] [--size b16|tiny] [--only TABLE ...] [--results DIR]`: what
the GPU options buy (bench/gpu.sh runs it after bench.gpu_check). Three tables, each added to
DIR/gpu.md and DIR/gpu.json as soon as it is measured (the service's logs beside them), naming the device:

- raw ONNX Runtime, a random-weight ViT-B/16 (224x224, 16x16 patches, 12 layers, 768 wide) exported
  with export/onnx_export.py: float32, float16 (export/fp16.py's conversion) and TensorRT, at batch
  1, 32 and 128, run as the service runs them (I/O binding on a GPU); images/s;
- the service (`python -m service`) serving that ViT as a classification model, JPEG photos
  (scikit-learn's sample images at 1920x1440) in, at concurrency 1, 32 and 128; requests/s, p50, p99,
  the mean batch it formed, and its share of raw ONNX Runtime's images/s at that batch size;
- generation with the shipped Image Transformer: images/s at num_images 64 with the key/value caches
  in the device's pool (the pooled step graph, `VITSERVE_DEVICE_CACHE=on`) against the host cache,
  both through the batcher, same seed (and whether the images came out the same).

`--size tiny` shrinks every figure's model and load so the whole runs in a minute on a CPU.
The served ViT is a benchmark artifact: its manifest is written here, with no parity check."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import onnx
import onnxruntime as ort
import torch

from bench.common import interleaved, markdown
from bench.peers.load import load
from bench.peers.photos import photos
from bench.peers.servers import raw
from bench.service import server
from export.fp16 import to_fp16
from export.onnx_export import OPSET, to_onnx
from models.vit import ViT, ViTConfig
from service.manifest import GraphSpec, Manifest, Parity, Preprocessing, TensorSpec, write_manifest
from service.runtime import CPU, CUDA, TENSORRT, on_cuda, preload_gpu_libraries, run, tensorrt_options

SIZES: dict[str, dict[str, Any]] = {
    "b16": {"vit": ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, dim=768, depth=12,
                             heads=12, mlp_dim=3072, dropout=0.0),
            "batches": [1, 32, 128], "concurrency": [1, 32, 128], "num_images": 64, "seconds": 10.0},
    "tiny": {"vit": ViTConfig(image_size=32, patch_size=8, in_channels=3, num_classes=10, dim=32, depth=2, heads=2,
                              mlp_dim=64, dropout=0.0),
             "batches": [1, 8], "concurrency": [1, 8], "num_images": 8, "seconds": 2.0},
}  # fmt: skip
NAME = "vitbench"


def device_name(device: str) -> str:
    if device == "cpu":
        return f"CPU ({len(os.sched_getaffinity(0))} cores)"
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU (no nvidia-smi)"


def export_vit(cfg: ViTConfig, folder: Path) -> tuple[Path, Path]:
    """The ViT with random weights, traced by the export path; and its float16 conversion."""
    torch.manual_seed(0)
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    full, half = folder / "model.onnx", folder / "model_fp16.onnx"
    to_onnx(ViT(cfg).eval(), (example,), full, ["pixel_values"], ["logits"])
    onnx.save(to_fp16(onnx.load(full)), half)
    return full, half


def image_spec(cfg: ViTConfig) -> GraphSpec:
    image = TensorSpec(name="pixel_values", dtype="float32", shape=["batch", 3, cfg.image_size, cfg.image_size])
    logits = TensorSpec(name="logits", dtype="float32", shape=["batch", cfg.num_classes])
    return GraphSpec(file="model.onnx", inputs=[image], outputs=[logits])


def providers(cfg: ViTConfig, device: str, kind: str, batches: list[int], cache: Path) -> list[Any]:
    """CPU; or CUDA; or TensorRT with the service's options (float16, one profile over `batches`)."""
    if device == "cpu":
        return [CPU]
    cuda = (CUDA, {"device_id": "0"})
    if kind != "tensorrt":
        return [cuda, CPU]
    cache.mkdir(parents=True, exist_ok=True)
    return [(TENSORRT, tensorrt_options(image_spec(cfg), batches, cache, fp16=True)), cuda, CPU]


def raw_rows(
    cfg: ViTConfig, files: tuple[Path, Path], device: str, batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    variants = {"fp32": files[0], "fp16": files[1]}
    if device == "cuda":
        variants["tensorrt (fp16)"] = files[0]
    rows = []
    for name, path in variants.items():
        kind = "tensorrt" if name.startswith("tensorrt") else "plain"
        try:
            chosen = providers(cfg, device, kind, batches, path.parent / "trt")
            session = ort.InferenceSession(str(path), providers=chosen)
        except Exception as exc:  # TensorRT's libraries missing, say: the row says so
            rows.append({"variant": name, "providers": f"failed: {str(exc)[:80]}"})
            continue
        rows.append({"variant": name, "providers": session.get_providers()[0], **throughput(session, cfg, batches,
                                                                                              repeats)})  # fmt: skip
    return rows


def throughput(session: ort.InferenceSession, cfg: ViTConfig, batches: list[int], repeats: int) -> dict[str, float]:
    """Images/s at each batch size, run as the service runs it (I/O binding on a GPU)."""
    row = {}
    for batch in batches:
        shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        feeds = {"pixel_values": np.random.default_rng(0).random(shape, dtype=np.float32)}
        seconds = interleaved({"run": lambda f=feeds: run(session, f, on_cuda(session))}, repeats, warmup=3)
        row[f"batch {batch} images/s"] = batch / seconds["run"]
    return row


def repository(cfg: ViTConfig, model: Path, root: Path, max_batch: int) -> Path:
    """A one-model repository serving the benchmark ViT (ImageNet's mean and std, 1,000 or 10 labels)."""
    folder = root / NAME / "1"
    folder.mkdir(parents=True)
    shutil.copy(model, folder / "model.onnx")
    manifest = Manifest(
        name=NAME, version=1, task="classification", architecture="vit", graphs={"main": image_spec(cfg)},
        preprocessing=Preprocessing(color_mode="RGB", size=(cfg.image_size, cfg.image_size), resample="bilinear",
                                    mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        labels=[f"class {i}" for i in range(cfg.num_classes)], data={"name": "random weights (benchmark)"},
        quality={}, opset=OPSET, versions={"onnxruntime": ort.__version__},
        parity=Parity(max_abs_diff=0.0, tolerance=0.0, batch_size=0, traced_batch_size=2, argmax_equal=True),
        serving={"max_batch_size": max_batch, "max_queue_size": 4 * max_batch},
    )  # fmt: skip
    write_manifest(manifest, folder)
    return root


def batches_formed(url: str) -> tuple[float, float]:
    """(images, runs) the benchmark model's batcher has run so far, from /metrics."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in httpx2.get(f"{url}/metrics").text.splitlines():
        for kind in totals:
            if line.startswith(f"vitserve_batch_size_{kind}{{") and f'model="{NAME}"' in line:
                totals[kind] += float(line.rsplit(" ", 1)[1])
    return totals["sum"], totals["count"]


def service_rows(
    root: Path, cfg: ViTConfig, model: Path, device: str, concurrency: list[int], seconds: float, repeats: int,
    logs: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """The service under JPEG load at each concurrency, and its share of raw ONNX Runtime's images/s
    at the mean batch size it formed (the issue's target: at least 80%), raw measured after the
    service has stopped, as the service runs it (I/O binding on a GPU)."""
    requests = [raw("/v1/classify")(jpeg, "image/jpeg") for jpeg in photos()]
    env = {"VITSERVE_MODEL_REPOSITORY": str(root), "VITSERVE_DEVICE": device}
    rows = []
    with server(["-m", "service"], env, 180, logs / "service-vit.log") as url:  # CUDA's start, warm-up at 8 sizes
        for c in concurrency:
            before = batches_formed(url)
            result = load(url, requests, c, seconds, warmup=1.0)
            images, runs = (after - earlier for after, earlier in zip(batches_formed(url), before, strict=True))
            rows.append({"concurrency": c, "requests/s": result.rate, "p50 ms": result.p50, "p99 ms": result.p99,
                         "errors": result.errors, "mean batch": images / max(runs, 1)})  # fmt: skip
    session = ort.InferenceSession(str(model), providers=providers(cfg, device, "plain", [], model.parent))
    for row in rows:
        batch = max(1, round(row["mean batch"]))
        raw_rate = throughput(session, cfg, [batch], repeats)[f"batch {batch} images/s"]
        row |= {"raw ORT images/s at that batch": raw_rate, "service / raw": row["requests/s"] / raw_rate}
    return rows


def generation_rows(device: str, num_images: int, repeats: int, logs: Path) -> list[dict[str, Any]]:
    """The shipped Image Transformer served twice side by side, the key/value cache on the device and
    on the host (VITSERVE_DEVICE_CACHE), taking turns: one request of `num_images` at a time."""
    body = {"num_images": num_images, "seed": 0, "scale": 1}
    policy = json.dumps({"imagetransformer": {"max_batch_size": max(num_images, 32)}})
    env = {"VITSERVE_DEVICE": device, "VITSERVE_BATCH_POLICY": policy}
    with (
        server(["-m", "service"], {**env, "VITSERVE_DEVICE_CACHE": "on"}, 180, logs / "service-pool.log") as on_device,
        server(["-m", "service"], {**env, "VITSERVE_DEVICE_CACHE": "off"}, 180, logs / "service-host.log") as on_host,
    ):
        answers = {
            url: httpx2.post(f"{url}/v1/generate", json=body, timeout=600).json() for url in (on_device, on_host)
        }
        same = answers[on_device]["images"] == answers[on_host]["images"]  # kernels may differ in the last bit
        seconds = interleaved(
            {url: lambda url=url: httpx2.post(f"{url}/v1/generate", json=body, timeout=600) for url in answers},
            repeats,
        )
        provider = httpx2.get(f"{on_device}/v1/models").json()["models"]
    providers = next(m["providers"][0] for m in provider if m["name"] == "imagetransformer")
    return [{"num_images": num_images, "device cache images/s": num_images / seconds[on_device],
             "host cache images/s": num_images / seconds[on_host], "ratio": seconds[on_host] / seconds[on_device],
             "same images": same, "provider": providers}]  # fmt: skip


class Tables:
    """The tables measured so far, in DIR/gpu.md and DIR/gpu.json: a run cut short keeps what it made."""

    def __init__(self, folder: Path, title: str, meta: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.markdown, self.json, self.tables = folder / "gpu.md", folder / "gpu.json", dict(meta)
        self.markdown.write_text(f"## {title}\n\n")
        print(f"\n## {title}\n", flush=True)

    def add(self, title: str, rows: list[dict[str, Any]]) -> None:
        self.tables[title] = rows
        self.json.write_text(json.dumps(self.tables, indent=2))
        with self.markdown.open("a") as out:
            out.write(f"### {title}\n\n{markdown(rows)}\n\n")
        print(f"### {title}\n\n{markdown(rows)}\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="b16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-images", type=int, help="generation's num_images (default: 64, tiny: 8)")
    parser.add_argument("--results", type=Path, default=Path("bench/results/gpu"), help="gpu.md, gpu.json, logs")
    parser.add_argument("--only", nargs="+", choices=["raw", "service", "generation"], default=[],
                        help="these tables only (e.g. `--device cpu --only service`: the service's share of raw "
                        "ONNX Runtime on this CPU, without the float16 runs a CPU takes minutes for)")  # fmt: skip
    args = parser.parse_args(argv)
    wanted = set(args.only or ["raw", "service", "generation"])
    size = SIZES[args.size]
    if args.device == "cuda":
        preload_gpu_libraries(tensorrt=True)  # as the service does: CUDA, cuDNN, TensorRT from NVIDIA's wheels
    title = f"{device_name(args.device)}, ViT {args.size}, onnxruntime {ort.__version__}"
    out = Tables(args.results, title, {"device": device_name(args.device), "size": args.size})
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        files = export_vit(size["vit"], Path(tmp))
        if "raw" in wanted:
            out.add("raw ONNX Runtime", raw_rows(size["vit"], files, args.device, size["batches"], args.repeats))
        if "service" in wanted:
            root = repository(size["vit"], files[0], Path(tmp) / "repository", max(size["concurrency"]))
            rows = service_rows(root, size["vit"], files[0], args.device, size["concurrency"], size["seconds"],
                                args.repeats, args.results)  # fmt: skip
            out.add("service, JPEG photos", rows)
    if "generation" in wanted:
        num_images = args.num_images or size["num_images"]
        out.add("generation", generation_rows(args.device, num_images, args.repeats, args.results))


if __name__ == "__main__":
    main()
