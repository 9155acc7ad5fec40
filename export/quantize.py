"""`python -m export.quantize NAME [--version V] [--to VERSION] [--calibration FOLDER] [--force]`: a
float32 model of the repository quantized to INT8 with ONNX Runtime's dynamic quantization (weights
of the MatMuls and Gemms in int8, activations quantized per run), written as a new version (default:
the next) and published only past a quality gate against the version it came from:

- classification: top-1 agreement at least 99%, and held-out accuracy within 0.5 points;
- detection: held-out mAP within 0.01;
- a model without labelled held-out data (an import): top-1 agreement over `--calibration` images.

Where the gate refuses, nothing is published, unless `--force`, which publishes with the failed gate
recorded in the manifest (`int8_gate`), for benchmarking a random-weight model. Only the main graph is
quantized: the attention graphs stay float32 (their maps are what a user reads). The service serves
a model's highest version, so the new version is what it serves at its next start."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from export.fp16 import HELD_OUT, run_all
from export.onnx_export import ExportError, publish, require_free
from service.imaging import decode_image, preprocess
from service.manifest import CLASSIFICATION, DETECTION, Manifest, QuantizationGate, read_manifest
from service.settings import PROJECT_ROOT

BOUNDS = {"top1_agreement": 0.99, "accuracy": 0.005, "map": 0.01}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_CALIBRATION_IMAGES = 512
Figures = dict[str, tuple[float, float]]


def quantize_graph(source: Path, target: Path) -> None:
    """Dynamic INT8: signed 8-bit weights (on AVX2 without VNNI, 2.5-2.7x a ViT-B/16's float32
    images/s here, where unsigned weights gave 1.3-1.5x: docs/benchmarks.md)."""
    model = onnx.load(source)
    del model.graph.value_info[:]  # the exporter's shape hints can contradict ONNX's own inference
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        cleaned = Path(tmp) / "model.onnx"
        onnx.save(model, cleaned)
        quantize_dynamic(cleaned, target, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)


def agreement(full: np.ndarray, quantized: np.ndarray) -> float:
    """How often the two graphs' argmax over the last axis (the classes) agree."""
    return float((full.argmax(-1) == quantized.argmax(-1)).mean())


def calibration_feeds(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The folder's images (at most MAX_CALIBRATION_IMAGES), preprocessed as the service would."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_CALIBRATION_IMAGES]
    if not files:
        raise ExportError(f"no images in {folder}")
    images = [decode_image(path.read_bytes(), 10**8) for path in files]
    name = manifest.main.inputs[0].name
    return {name: np.stack([preprocess(image, manifest.preprocessing) for image in images])}


def held_out_figures(manifest: Manifest, full: Path, quantized: Path) -> tuple[Figures, int]:
    """The task's held-out figures, float32 against INT8, from the data the manifest names."""
    held_out = HELD_OUT[manifest.task](manifest)
    outputs = run_all(full, held_out.feeds), run_all(quantized, held_out.feeds)
    samples = len(next(iter(held_out.feeds.values())))
    if manifest.task == DETECTION:
        return {"map": held_out.figures(*outputs)}, samples
    full, int8 = (float((out[0].argmax(-1) == held_out.labels).mean()) for out in outputs)
    return {"top1_agreement": (1.0, agreement(outputs[0][0], outputs[1][0])), "accuracy": (full, int8)}, samples


def gate(manifest: Manifest, full: Path, quantized: Path, calibration: Path | None) -> QuantizationGate:
    """The INT8 graph's figures against the float32 graph's, and whether they pass."""
    if manifest.task not in (CLASSIFICATION, DETECTION):
        raise ExportError(f"INT8 is for classification and detection models, not {manifest.task}")
    if isinstance(manifest.data.get("source"), dict) and calibration is None:  # labelled data it can reload
        figures, samples = held_out_figures(manifest, full, quantized)
    elif calibration is not None:
        feeds = calibration_feeds(calibration, manifest)
        agreed = agreement(run_all(full, feeds)[0], run_all(quantized, feeds)[0])
        figures, samples = {"top1_agreement": (1.0, agreed)}, len(next(iter(feeds.values())))
    else:
        raise ExportError("this model names no held-out data (an import): give --calibration FOLDER of images")
    passed = all(
        quantized_figure >= BOUNDS[name] if name == "top1_agreement" else abs(quantized_figure - figure) <= BOUNDS[name]
        for name, (figure, quantized_figure) in figures.items()
    )
    bounds = {name: BOUNDS[name] for name in figures}
    return QuantizationGate(method="dynamic", source_version=manifest.version, samples=samples, figures=figures,
                            bounds=bounds, passed=passed)  # fmt: skip


def quantize_model(
    repository: Path, name: str, version: int | None = None, to: int | None = None,
    calibration: Path | None = None, force: bool = False,
) -> Manifest:  # fmt: skip
    """Version `version` (default: the highest) of `name` quantized into version `to` (default: the
    next), gated, and published (a failed gate publishes only with `force`, recorded)."""
    versions = sorted(int(p.name) for p in (repository / name).iterdir() if p.name.isdigit())
    version = version or versions[-1]
    to = to or versions[-1] + 1
    require_free(repository, name, to, force)
    source = repository / name / str(version)
    manifest = read_manifest(source)
    if manifest.precision != "float32":
        raise ExportError(f"{name} version {version} is {manifest.precision}: quantize a float32 version")
    with tempfile.TemporaryDirectory(prefix="export-int8-") as tmp:
        staged = Path(tmp) / name / str(to)
        shutil.copytree(source, staged)
        quantize_graph(source / manifest.main.file, staged / manifest.main.file)
        result = gate(manifest, source / manifest.main.file, staged / manifest.main.file, calibration)
        if not result.passed and not force:
            raise ExportError(f"INT8 quality gate failed: {describe(result)}; nothing was published (--force "
                              "publishes it with the failed gate recorded)")  # fmt: skip
        quantized = manifest.model_copy(update={"version": to, "precision": "int8", "int8_gate": result})
        publish(quantized, staged, repository, force)
    return quantized


def describe(result: QuantizationGate) -> str:
    shown = [f"{name} {int8:.4f} against {full:.4f} (bound {result.bounds[name]})"
             for name, (full, int8) in result.figures.items()]  # fmt: skip
    return f"{', '.join(shown)} on {result.samples} images"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__)
    parser.add_argument("name")
    parser.add_argument("--version", type=int, help="the float32 version to quantize (default: the highest)")
    parser.add_argument("--to", type=int, help="the new version (default: the next)")
    parser.add_argument("--calibration", type=Path, help="images to gate a model without held-out data on")
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--force", action="store_true", help="replace an existing version; publish a failed gate")
    args = parser.parse_args(argv)
    try:
        manifest = quantize_model(args.repository, args.name, args.version, args.to, args.calibration, args.force)
    except ExportError as exc:
        parser.exit(1, f"{exc}\n")
    gate_result = manifest.int8_gate
    assert gate_result is not None
    print(json.dumps({"published": f"{manifest.name}/{manifest.version}", "passed": gate_result.passed,
                      "gate": describe(gate_result)}))  # fmt: skip


if __name__ == "__main__":
    main()
