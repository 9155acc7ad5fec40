"""`python -m bench.gpu_check [--device cuda|cpu] [--results DIR]`: is the GPU path right, before
anything is timed (bench/gpu.sh runs it first). Each result is appended to DIR/check.jsonl and
printed as it is made, so a run cut short still leaves what it found:

- placement: every graph of every shipped model opened as the service opens it, with CUDA graphs
  off and on: the provider it runs on, the nodes ONNX Runtime left on the CPU (from its profile),
  and whether it refused to capture;
- replays: each replayable graph run through CUDA graphs (warmed sizes 1, 2, 4, 8) at batch sizes
  1 to 11, against the CPU provider's outputs (11 is over every warmed size: an uncaptured run);
- pool: the Image Transformer generating with its caches in the device's pool, with CUDA graphs off
  and on, against the host cache with the same seed (the same images), while another generation's
  slots stay untouched.

On the CPU (`--device cpu`, as tests/unit/test_gpu_check.py runs it) the same code runs on the CPU
provider. Exits 1 when a check fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.manifest import GenerationConfig, GraphSpec, read_manifest
from service.repository import load_model, warm_up, zeros
from service.runtime import (
    CPU,
    DeviceUnavailable,
    check_device,
    create_session,
    cuda_graph,
    one_line,
    replayable,
    requested_providers,
    runner,
    session_options,
    session_provider_options,
)
from service.sampling import POOLED_GRAPH, CachePool, PooledSteps, finished, sample, sample_rows
from service.settings import PROJECT_ROOT, Settings
from service.tasks import TASKS, manifest_checks

SHIPPED = PROJECT_ROOT / "model_repository"
SIZES = [1, 2, 4, 8]
ROWS = [1, 2, 3, 5, 8, 11]
TOLERANCE = 1e-3  # CUDA's float32 (TF32 matrix products where ONNX Runtime allows them) against the CPU's


class Results:
    """Each result as a JSON line, written and flushed as it is made."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = (folder / "check.jsonl").open("a")
        self.failed = 0

    def add(self, check: str, ok: bool, **fields: Any) -> None:
        row = {"check": check, "ok": ok, **fields}
        self.failed += not ok
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        print(("ok   " if ok else "FAIL ") + json.dumps(row, default=str), flush=True)


def model_graphs() -> list[tuple[str, str, Path, GraphSpec]]:
    """(model, graph, file, spec) of every graph of the newest version of every shipped model."""
    found = []
    for folder in sorted(p for p in SHIPPED.iterdir() if p.is_dir() and not p.name.startswith(".")):
        version = max((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for graph, spec in read_manifest(version).graphs.items():
            found.append((folder.name, graph, version / spec.file, spec))
    return found


def every_axis_one(spec: GraphSpec) -> dict[str, np.ndarray]:
    """Zeros for every input, the pools' included, each free axis 1 long."""
    return {t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape], t.dtype) for t in spec.inputs}


def placement(path: Path, spec: GraphSpec, settings: Settings, folder: Path) -> dict[str, Any]:
    """The session's providers and, from ONNX Runtime's profile of one run, the nodes each ran."""
    options = session_options(settings)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / path.stem)
    providers = requested_providers(settings.device, settings.tensorrt)
    per_provider = session_provider_options(providers, path, settings, spec, [1], fp16=False)
    try:
        session = ort.InferenceSession(
            str(path), options, providers=providers, provider_options=per_provider, enable_fallback=0
        )
        run = runner(session, [1])
        for _ in range(3):  # ONNX Runtime captures a CUDA graph after two ordinary runs
            run(every_axis_one(spec))
    except Exception as exc:  # a refused capture, say: the row says why
        return {"error": one_line(exc)}
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e["args"] for e in events if e.get("cat") == "Node" and "provider" in e.get("args", {})]
    on_cpu = sorted({n["op_name"] for n in nodes if n["provider"] == CPU})
    return {"providers": session.get_providers(), "nodes by provider": dict(Counter(n["provider"] for n in nodes)),
            "ops run on the CPU": on_cpu, "cuda graph": cuda_graph(session)}  # fmt: skip


def check_placement(results: Results, device: str, folder: Path) -> None:
    for model, graph, path, spec in model_graphs():
        for graphs in (False, True):
            found = placement(path, spec, Settings(device=device, cuda_graphs=graphs), folder)  # type: ignore[arg-type]
            on_device = "error" not in found and found["providers"][0] == requested_providers(device)[0]
            results.add("placement", on_device, model=model, graph=graph, cuda_graphs=graphs, **found)


def random_feeds(spec: GraphSpec, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = zeros(spec, rows)
    return {n: rng.normal(size=a.shape).astype(a.dtype) if a.dtype.kind == "f" else a for n, a in feeds.items()}


def check_replays(results: Results, device: str) -> None:
    """Replayable graphs through the service's runner with CUDA graphs on, against the CPU provider."""
    rng = np.random.default_rng(0)
    for model, graph, path, spec in model_graphs():
        if graph == POOLED_GRAPH or not replayable(spec):
            continue  # the pool has its own check
        settings = Settings(device=device, cuda_graphs=True)  # type: ignore[arg-type]
        session = create_session(path, settings, spec, SIZES)
        run = runner(session, SIZES)
        warm_up(run, spec, SIZES, times=3)
        cpu = create_session(path, Settings(device="cpu"), spec)
        for rows in ROWS:
            feeds = random_feeds(spec, rows, rng)
            diffs = [float(np.abs(a - b).max()) for a, b in zip(run(feeds), cpu.run(None, feeds), strict=True)]
            results.add("replays", max(diffs) <= TOLERANCE, model=model, graph=graph, batch=rows,
                        replayed=cuda_graph(session) and rows <= max(SIZES), max_abs_diff=max(diffs))  # fmt: skip


def check_pool(results: Results, device: str) -> None:
    """One seed through the device pool and through the host cache: the same images; and the slots of
    a generation finished before are untouched by the next one."""
    for graphs in (False, True):
        settings = Settings(device=device, device_cache="on", cuda_graphs=graphs, warmup=False)  # type: ignore[arg-type]
        model = load_model(SHIPPED / "imagetransformer", settings, manifest_checks(TASKS))
        assert model.manifest is not None, model.reason
        cfg = GenerationConfig.model_validate(model.manifest.config)
        pool = CachePool(model.sessions[POOLED_GRAPH], capacity=8, sizes=[1, 4, 8])
        warm_up(pool.run, model.manifest.graphs[POOLED_GRAPH], [1, 4, 8], times=3)
        labels = np.array([2, 5, 9], dtype=np.int64)  # 3 images: runs padded to 4 with CUDA graphs
        earlier = pool.acquire(3)
        asyncio.run(generate(pool, cfg, earlier, labels, seed=1))
        before = [value.numpy()[earlier].copy() for value in pool.bound.values()]
        images = asyncio.run(generate(pool, cfg, pool.acquire(3), labels, seed=7))
        host = sample(model.sessions["step"], cfg, labels, seed=7)
        untouched = all(np.array_equal(b, v.numpy()[earlier]) for b, v in zip(before, pool.bound.values(), strict=True))
        same = bool(np.array_equal(images, host))
        results.add("pool", same and untouched, cuda_graphs=graphs, providers=model.providers, same_images=same,
                    differing_pixels=int((images != host).sum()), other_slots_untouched=untouched)  # fmt: skip


async def generate(pool: CachePool, cfg: GenerationConfig, slots: np.ndarray, labels: np.ndarray, seed: int) -> Any:
    async def step(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return pool.run(feeds)

    return await finished(sample_rows(PooledSteps(step, pool, slots, None), cfg, labels, np.random.default_rng(seed)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--results", type=Path, default=Path("bench/results/gpu-check"))
    args = parser.parse_args(argv)
    results = Results(args.results)
    try:
        check_device(Settings(device=args.device))
    except DeviceUnavailable as exc:  # nothing else can run on that device
        results.add("probe", False, device=args.device, onnxruntime=ort.__version__, reason=str(exc))
        sys.exit(1)
    results.add("probe", True, device=args.device, onnxruntime=ort.__version__, available=ort.get_available_providers())
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as profiles:
        check_placement(results, args.device, Path(profiles))
    check_replays(results, args.device)
    check_pool(results, args.device)
    print(f"{results.failed} failed", flush=True)
    sys.exit(1 if results.failed else 0)


if __name__ == "__main__":
    main()
