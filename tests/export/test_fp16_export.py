"""Float16 export (`python -m export.export MODEL --fp16`): graphs converted with float32 inputs and
outputs, published only through a quality gate on held-out data, and served; a broken conversion
fails its gate and writes nothing. All on the CPU provider, with the tiny models of conftest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import vit
from export.export import main as export_main
from export.fp16 import AGREEMENT, convert_artifact, export_fp16, to_fp16
from export.onnx_export import ExportError
from service.manifest import read_manifest
from service.settings import Settings
from tests.conftest import TINY_DETR, TINY_GENERATOR, TINY_NAME, client_for, tiny_checkpoint
from tests.helpers import held_out_digits, png_bytes


def test_fp16_export_passes_its_gate_and_serves(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    export_main(["vit", "--checkpoint", str(checkpoint), "--repository", str(tmp_path), "--name", "half", "--fp16"])
    assert json.loads(capsys.readouterr().out)["fp16_gate"]["metric"] == "argmax_agreement"
    manifest = read_manifest(tmp_path / "half" / "1")
    gate = manifest.fp16_gate
    assert manifest.precision == "float16" and gate is not None
    assert gate.float16 >= AGREEMENT and gate.bound == AGREEMENT and gate.samples >= 250
    assert all(t.dtype == "float32" for g in manifest.graphs.values() for t in [*g.inputs, *g.outputs])
    weights = onnx.load(tmp_path / "half" / "1" / "model.onnx").graph.initializer
    assert {onnx.TensorProto.FLOAT16} <= {w.data_type for w in weights}  # the weights really are float16
    shutil.copytree(tiny_repository / TINY_NAME, tmp_path / TINY_NAME)
    digits, _ = held_out_digits()
    files = [("file", (f"{i}.png", png_bytes(d), "image/png")) for i, d in enumerate(digits[:32])]
    for client in client_for(Settings(model_repository=tmp_path, device="cpu")):
        half = client.post("/v1/classify?model=half", files=files)
        full = client.post(f"/v1/classify?model={TINY_NAME}", files=files)
        assert half.status_code == 200, half.text
        agree = [
            h[0]["label"] == f[0]["label"] for h, f in zip(half.json()["results"], full.json()["results"], strict=True)
        ]
        assert sum(agree) >= 31
        assert client.get("/v1/models").status_code == 200


def scrambled(model: onnx.ModelProto) -> onnx.ModelProto:
    """A conversion gone wrong: every float16 weight's values shuffled."""
    model = to_fp16(model)
    rng = np.random.default_rng(0)
    for i, weight in enumerate(model.graph.initializer):
        if weight.data_type == onnx.TensorProto.FLOAT16 and len(weight.dims):
            values = numpy_helper.to_array(weight)
            shuffled = rng.permutation(values.ravel()).reshape(values.shape)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(shuffled, weight.name))
    return model


def test_a_broken_conversion_fails_the_gate_and_writes_nothing(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    repository = tmp_path / "repository"
    with pytest.raises(ExportError, match="float16 quality gate failed: argmax_agreement"):
        export_fp16(vit, checkpoint, repository, "broken", convert=scrambled)
    assert not (repository / "broken").exists()


def converted(repository: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name / "1"
    target.mkdir(parents=True)
    convert_artifact(repository / name / "1", target)
    return target


def test_detection_gate_is_map_within_0_005(tiny_detr_repository: Path, tmp_path: Path) -> None:
    gate = read_manifest(converted(tiny_detr_repository, TINY_DETR, tmp_path)).fp16_gate
    assert gate is not None and gate.metric == "map" and gate.bound == 0.005
    assert abs(gate.float16 - gate.float32) <= 0.005 and gate.samples == 40


def test_generation_gate_is_bits_per_dim_within_0_01(tiny_generator_repository: Path, tmp_path: Path) -> None:
    target = converted(tiny_generator_repository, TINY_GENERATOR, tmp_path)
    gate = read_manifest(target).fp16_gate
    assert gate is not None and gate.metric == "bits_per_dim" and gate.bound == 0.01
    assert abs(gate.float16 - gate.float32) <= 0.01 and gate.float32 > 1
    for device_cache in ("off", "on"):  # the float16 step graph, and the pooled one built from it
        for client in client_for(Settings(model_repository=tmp_path, device="cpu", device_cache=device_cache)):
            response = client.post("/v1/generate", json={"num_images": 2, "seed": 1, "scale": 1})
            assert response.status_code == 200, response.text


def test_the_generator_exports_in_fp16_through_the_whole_path(
    tiny_generator_repository: Path, tiny_repository: Path, tmp_path: Path
) -> None:
    from export import image_transformer

    checkpoint = tiny_generator_repository.parent / "tinygen.pt"  # written by the fixture
    manifest = export_fp16(image_transformer, checkpoint, tmp_path, "halfgen", classifier=tiny_repository / TINY_NAME)
    assert manifest.precision == "float16" and manifest.fp16_gate is not None
    assert read_manifest(tmp_path / "halfgen" / "1").fp16_gate == manifest.fp16_gate
    assert {"score.onnx", "attention.onnx", "step.onnx", "pooled_step.onnx", "manifest.json"} <= {
        p.name for p in (tmp_path / "halfgen" / "1").iterdir()
    }
