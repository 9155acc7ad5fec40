"""`python -m bench.int8 [--rounds N] [--seconds S]`: INT8 that passes its gate and pays, end to end.

The shipped ViT is too narrow for INT8 to pay (64 wide: its layer norms, softmax and patch
convolution, which INT8 leaves alone, cost as much as its MatMuls), and a random-weight ViT-B/16
pays 2.5x but cannot pass a gate (its logits are too close for any top-1 to be stable). So this
trains a model in between, once, under bench/.cache/int8/: the project's own ViT, 256 wide (4
layers, 4 heads, MLP 1,024; 32x32 digits in 4x4 patches, 3.2M weights), by the project's trainer and
recipe (40 epochs at 1e-3, about 12 minutes on 2 cores), exported as `python -m export` does. Then
`export.quantize` quantizes it against its held-out digits with the gate users get (top-1 agreement
at least 99%, held-out accuracy within 0.5 points), not forced. Then both versions are timed:

- in-process: ONNX Runtime on both graphs with the service's session settings, batch 1 and 8,
  interleaved, medians (the figure `docs/training.md` gives for every model);
- served: two `python -m service`, one serving the float32 version and one the INT8 version,
  taking turns at concurrency 1 and 8 with the held-out digits as PNG uploads; requests/s, medians
  of the rounds.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx2
import numpy as np
from PIL import Image

from bench.common import interleaved, markdown
from bench.peers.load import load
from bench.peers.procs import cpu_seconds
from bench.peers.servers import Request, free_port
from service.manifest import read_manifest
from service.settings import PROJECT_ROOT

CACHE = PROJECT_ROOT / "bench" / ".cache" / "int8"
NAME = "vitwide"
EPOCHS, LR = 40, 1e-3


def trained(repository: Path) -> Path:
    """The wide ViT, trained and exported once (float32, version 1)."""
    if (repository / NAME / "1" / "manifest.json").exists():
        return repository / NAME / "1"
    import torch

    from export.families import FAMILIES
    from models.vit import ViTConfig

    torch.set_num_threads(os.cpu_count() or 1)
    family = FAMILIES["vit"]
    cfg = family.train_config(seed=0)
    cfg.epochs, cfg.lr = EPOCHS, LR
    wide = ViTConfig(image_size=32, patch_size=4, in_channels=1, num_classes=10, dim=256, depth=4, heads=4,
                     mlp_dim=1024)  # fmt: skip
    checkpoint = CACHE / "checkpoint.pt"
    family.train({"kind": "digits", "seed": 0}, checkpoint, model_cfg=wide, cfg=cfg)
    family.export(checkpoint, repository, name=NAME, version=1, force=True, **family.export_options(repository))
    return repository / NAME / "1"


def quantized(repository: Path) -> Path:
    """Version 2: version 1 through `export.quantize` and its gate (a refused gate stops the benchmark)."""
    from export.quantize import quantize_model

    if not (repository / NAME / "2" / "manifest.json").exists():
        quantize_model(repository, NAME, version=1, to=2)
    return repository / NAME / "2"


def in_process(float32: Path, int8: Path, repeats: int) -> list[dict[str, object]]:
    """Images/s of the two main graphs, batch 1 and 8, the service's session settings, interleaved."""
    import onnxruntime as ort

    from service.runtime import session_options
    from service.settings import Settings

    manifest = read_manifest(float32)
    sessions = {label: ort.InferenceSession(str(folder / manifest.main.file), session_options(Settings()),
                                            providers=["CPUExecutionProvider"])  # fmt: skip
                for label, folder in (("float32", float32), ("int8", int8))}  # fmt: skip
    name, (channels, side) = manifest.main.inputs[0].name, (1, manifest.preprocessing.size[0])
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, channels, side, side)).astype(np.float32)
        runs = 200 // batch
        seconds = interleaved({label: lambda s=s, x=x, runs=runs: [s.run(None, {name: x}) for _ in range(runs)]
                               for label, s in sessions.items()}, repeats)  # fmt: skip
        rate = {label: batch * runs / s for label, s in seconds.items()}
        rows.append({"batch": batch, "float32 images/s": rate["float32"], "int8 images/s": rate["int8"],
                     "int8 ÷ float32": rate["int8"] / rate["float32"]})  # fmt: skip
    return rows


@contextmanager
def serving(repository: Path) -> Iterator[tuple[str, int]]:
    """`python -m service` on `repository` (REST only), ready; its URL and pid."""
    port = free_port()
    env = {**os.environ, "VITSERVE_MODEL_REPOSITORY": str(repository), "VITSERVE_GRPC_PORT": "0",
           "VITSERVE_LOG_LEVEL": "warning"}  # fmt: skip
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx2.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit(f"the service on {repository} was not ready in 120 s")
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def digit_requests() -> list[Request]:
    """The held-out digits as PNG uploads, each as a user would send it."""
    from export.data import load_digits_data

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    images = load_digits_data(seed=0).held_out.images
    return [Request(f"/v1/classify?model={NAME}", png(image), {"content-type": "image/png"}) for image in images]


def served(float32: Path, int8: Path, rounds: int, seconds: float) -> list[dict[str, object]]:
    """Requests/s and CPU per request of the two versions served side by side, turn by turn."""
    requests = digit_requests()
    with ExitStack() as stack:
        repositories = {}
        for label, folder in (("float32", float32), ("int8", int8)):
            repositories[label] = CACHE / f"serve-{label}"
            shutil.rmtree(repositories[label], ignore_errors=True)
            shutil.copytree(folder, repositories[label] / NAME / folder.name)
        servers = {label: stack.enter_context(serving(repository)) for label, repository in repositories.items()}
        rates: dict[tuple[str, int], list[float]] = {}
        cpus: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for concurrency in (1, 8):
                for label, (url, pid) in servers.items():
                    load(url, requests, concurrency, 1.0, warmup=0)
                    before = cpu_seconds(pid)
                    run = load(url, requests, concurrency, seconds, warmup=0)
                    if run.errors:
                        raise SystemExit(f"{label}: {run.errors} requests failed")
                    rates.setdefault((label, concurrency), []).append(run.rate)
                    cpus.setdefault((label, concurrency), []).append((cpu_seconds(pid) - before) / run.answered)
    rows = []
    for concurrency in (1, 8):
        rate = {label: statistics.median(rates[(label, concurrency)]) for label in ("float32", "int8")}
        cpu = {label: statistics.median(cpus[(label, concurrency)]) * 1000 for label in ("float32", "int8")}
        rows.append({"concurrency": concurrency, "float32 req/s": rate["float32"], "int8 req/s": rate["int8"],
                     "int8 ÷ float32": rate["int8"] / rate["float32"],
                     "CPU ms/request, float32 / int8": f"{cpu['float32']:.2f} / {cpu['int8']:.2f}"})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="served rounds, the two servers taking turns")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed served run")
    parser.add_argument("--repeats", type=int, default=15, help="in-process: interleaved repeats")
    args = parser.parse_args(argv)
    repository = CACHE / "repository"
    float32, int8 = trained(repository), quantized(repository)
    float32_manifest, gate = read_manifest(float32), read_manifest(int8).int8_gate
    assert gate is not None
    figures = ", ".join(f"{k} {v[0]:.4f} -> {v[1]:.4f} (bound {gate.bounds[k]})" for k, v in gate.figures.items())
    print(f"{NAME}: held-out top-1 {float32_manifest.quality['top1']:.4f}; INT8 gate "
          f"{'passed' if gate.passed else 'FAILED'} on {gate.samples} held-out digits: {figures}")  # fmt: skip
    print("in-process, the service's session settings\n" + markdown(in_process(float32, int8, args.repeats)))
    print("served, python -m service\n" + markdown(served(float32, int8, args.rounds, args.seconds)))


if __name__ == "__main__":
    main()
