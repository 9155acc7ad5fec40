"""Float16 export: every graph of an exported float32 artifact converted to float16 (inputs and outputs
kept float32), published only if it passes a quality gate on held-out data. Float16 cannot meet the
1e-4 parity gate, so it is judged by what users see: argmax agreement with the float32 graph (at least
99.5%) for classification, mAP within 0.005 for detection, bits per dimension within 0.01 for
generation. The figures go in the manifest (`precision`, `fp16_gate`)."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.onnx_export import ExportError, publish, require_free
from export.pooled import write_pooled
from service.imaging import preprocess
from service.manifest import Manifest, QualityGate, write_manifest
from service.sampling import POOLED_GRAPH

Convert = Callable[[onnx.ModelProto], onnx.ModelProto]
# the float32 graph's outputs and the float16 graph's, on the same held-out feeds -> their two figures
Figures = Callable[[list[np.ndarray], list[np.ndarray]], tuple[float, float]]

AGREEMENT = 0.995  # argmax agreement, at least
BOUNDS = {"argmax_agreement": AGREEMENT, "map": 0.005, "bits_per_dim": 0.01}
CHUNK = 64


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and math in float16; float32 at the inputs and outputs, so no caller changes."""
    converted: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=True)
    return converted


@dataclass
class HeldOut:
    feeds: dict[str, np.ndarray]
    metric: str
    figures: Figures
    labels: np.ndarray | None = None  # a classifier's true classes, in the feeds' order


def classification(manifest: Manifest) -> HeldOut:
    from export import vit

    held_out = vit.load_data(manifest.data["source"]).held_out
    feeds = {"pixel_values": np.stack([preprocess(image, manifest.preprocessing) for image in held_out.images])}

    def agreement(full: list[np.ndarray], half: list[np.ndarray]) -> tuple[float, float]:
        return 1.0, float((full[0].argmax(-1) == half[0].argmax(-1)).mean())

    return HeldOut(feeds, "argmax_agreement", agreement, held_out.labels)


def detection(manifest: Manifest) -> HeldOut:
    from export import detr

    _, data = detr.load_data(manifest.data["source"])
    spec = manifest.preprocessing

    def maps(full: list[np.ndarray], half: list[np.ndarray]) -> tuple[float, float]:
        return detr.evaluate(data, *full[:2], spec)["map"], detr.evaluate(data, *half[:2], spec)["map"]

    return HeldOut({"pixel_values": detr.inputs_for(data, spec)}, "map", maps)


def generation(manifest: Manifest) -> HeldOut:
    from export import image_transformer

    *_, pixels, labels = image_transformer.load_split(manifest.data["source"]["seed"])

    def bits(outputs: list[np.ndarray]) -> float:  # the scoring graph's log-likelihood per image
        return float(-outputs[1].astype(np.float64).mean() / (pixels.shape[1] * math.log(2)))

    return HeldOut(
        {"pixels": pixels.numpy(), "labels": labels.numpy()}, "bits_per_dim", lambda f, h: (bits(f), bits(h))
    )


HELD_OUT: dict[str, Callable[[Manifest], HeldOut]] = {
    "classification": classification,
    "detection": detection,
    "generation": generation,
}


def run_all(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of the graph at `path` over `feeds`, in chunks (on the CPU provider)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = len(next(iter(feeds.values())))
    chunks = [session.run(None, {k: v[i : i + CHUNK] for k, v in feeds.items()}) for i in range(0, total, CHUNK)]
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


def gate(held_out: HeldOut, full: Path, half: Path) -> QualityGate:
    """The main graph's figures, float32 against float16, on the held-out feeds."""
    float32, float16 = held_out.figures(run_all(full, held_out.feeds), run_all(half, held_out.feeds))
    samples = len(next(iter(held_out.feeds.values())))
    bound = BOUNDS[held_out.metric]
    return QualityGate(metric=held_out.metric, float32=float32, float16=float16, bound=bound, samples=samples)


def passed(result: QualityGate) -> bool:
    if result.metric == "argmax_agreement":
        return result.float16 >= result.bound
    return abs(result.float16 - result.float32) <= result.bound


def convert_artifact(
    staged: Path, target: Path, held_out: HeldOut | None = None, convert: Convert = to_fp16
) -> Manifest:
    """Convert the float32 artifact in `staged` into `target` (both `<name>/<version>/` folders), gated
    on `held_out` (default: the task's own held-out data, from the manifest's source); raises
    ExportError, leaving `target` incomplete, when the gate fails. For any exporter or importer."""
    manifest = Manifest.model_validate_json((staged / "manifest.json").read_text())
    held_out = held_out or HELD_OUT[manifest.task](manifest)
    for name, spec in manifest.graphs.items():
        if name != POOLED_GRAPH:  # rebuilt below: converted, its whole pools would be cast every step
            onnx.save(convert(onnx.load(staged / spec.file)), target / spec.file)
    if POOLED_GRAPH in manifest.graphs:
        write_pooled(manifest.graphs["step"], target)
    result = gate(held_out, staged / manifest.main.file, target / manifest.main.file)
    if not passed(result):
        raise ExportError(
            f"float16 quality gate failed: {result.metric} {result.float16:.4f} against {result.float32:.4f} "
            f"(bound {result.bound}) on {result.samples} held-out samples; nothing was written"
        )
    converted = manifest.model_copy(update={"precision": "float16", "fp16_gate": result})
    write_manifest(converted, target)
    return converted


class Exporter(Protocol):
    """A trained family (export.family.TrainedFamily) or its module: what has the float32, parity-gated `export`."""

    @property
    def export(self) -> Callable[..., Manifest]: ...


def export_fp16(
    family: Exporter, checkpoint: Path, repository: Path, name: str, version: int = 1, force: bool = False,
    convert: Convert = to_fp16, **options: Any,
) -> Manifest:  # fmt: skip
    """`family.export` (parity-gated, float32) into a scratch repository, then converted, gated and
    published to `repository` (the service loads it before it is moved in)."""
    require_free(repository, name, version, force)  # before the work, not after it
    with tempfile.TemporaryDirectory(prefix="export-fp16-") as tmp:
        full, half = Path(tmp) / "float32", Path(tmp) / "float16"
        family.export(checkpoint, full, name=name, version=version, **options)
        target = half / name / str(version)
        target.mkdir(parents=True)
        manifest = convert_artifact(full / name / str(version), target, convert=convert)
        publish(manifest, target, repository, force)
        shutil.rmtree(full)
    return manifest
