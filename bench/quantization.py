"""`python -m bench.quantization VERSION_DIR [--calibration FOLDER] [--repeats N]`: which INT8 a
model's main graph should take on this CPU: ONNX Runtime's dynamic quantization (what
`export.quantize` does) or static QDQ calibrated on images, against float32. One process, the three
sessions on every core taking turns, batch 1, median seconds per run; and each one's top-1
agreement with float32 on the calibration images (default: scikit-learn's two sample photos, cut
into 16 crops)."""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from sklearn.datasets import load_sample_images

from bench.common import interleaved, markdown
from export.quantize import agreement, calibration_feeds, quantize_graph
from service.manifest import read_manifest


class Images(CalibrationDataReader):
    def __init__(self, name: str, images: np.ndarray) -> None:
        self.feeds = iter({name: image[None]} for image in images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def crops(folder: Path) -> Path:
    """16 crops of 320x320 from the two sample photos, as JPEG files in `folder`."""
    for i, photo in enumerate(load_sample_images().images):
        for row in range(2):
            for col in range(4):
                crop = Image.fromarray(photo[row * 100 : row * 100 + 320, col * 100 : col * 100 + 320])
                buffer = io.BytesIO()
                crop.save(buffer, "JPEG", quality=90)
                (folder / f"{i}-{row}-{col}.jpg").write_bytes(buffer.getvalue())
    return folder


def quantize_static_qdq(source: Path, target: Path, name: str, images: np.ndarray) -> None:
    model = onnx.load(source)
    del model.graph.value_info[:]  # as export.quantize: the exporter's shape hints can contradict ONNX's
    cleaned, prepared = target.with_name("cleaned.onnx"), target.with_name("prepared.onnx")
    onnx.save(model, cleaned)
    quant_pre_process(str(cleaned), str(prepared), skip_symbolic_shape=True)
    quantize_static(prepared, target, Images(name, images), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__)
    parser.add_argument("version_dir", type=Path, help="a float32 model version, e.g. model_repository/vit/1")
    parser.add_argument("--calibration", type=Path, help="images (default: 16 crops of the sample photos)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.version_dir)
    with tempfile.TemporaryDirectory(prefix="bench-quantization-") as tmp:
        work = Path(tmp)
        (work / "crops").mkdir()
        calibration = args.calibration or crops(work / "crops")
        ((name, images),) = calibration_feeds(calibration, manifest).items()
        graphs = {"float32": args.version_dir / manifest.main.file, "dynamic": work / "dynamic.onnx",
                  "static QDQ": work / "static.onnx"}  # fmt: skip
        quantize_graph(graphs["float32"], graphs["dynamic"])
        quantize_static_qdq(graphs["float32"], graphs["static QDQ"], name, images)
        cpu = ["CPUExecutionProvider"]
        sessions = {kind: ort.InferenceSession(str(path), providers=cpu) for kind, path in graphs.items()}
        reference = sessions["float32"].run(None, {name: images})[0]
        one = {name: images[:1]}
        seconds = interleaved({kind: lambda s=s: s.run(None, one) for kind, s in sessions.items()}, args.repeats)
        rows = [{"graph": kind, "images/s": 1 / seconds[kind], "x float32": seconds["float32"] / seconds[kind],
                 "top-1 agreement": agreement(reference, s.run(None, {name: images})[0]), "images": len(images)}
                for kind, s in sessions.items()]  # fmt: skip
    print(f"\n{manifest.name} v{manifest.version}, batch 1, medians of {args.repeats} interleaved runs\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
