"""INT8 by ONNX Runtime's dynamic quantization (export/quantize.py), on copies of the shipped models:
a new version, gated against the float32 one, served by the service; a refused gate publishes
nothing unless forced (and then says so); an import is gated on calibration images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from export import quantize
from export.onnx_export import ExportError
from service.app import create_app
from service.manifest import read_manifest
from service.repository import load_model
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY
from tests.helpers import held_out_digits


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    for name in ("vit", "detr"):
        shutil.copytree(SHIPPED_REPOSITORY / name, tmp_path / name)
    return tmp_path


def test_the_vit_quantized_passes_its_gate_and_serves(repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quantize.main(["vit", "--repository", str(repository)])
    assert json.loads(capsys.readouterr().out)["published"] == "vit/2"
    manifest = read_manifest(repository / "vit" / "2")
    gate = manifest.int8_gate
    assert manifest.precision == "int8" and gate is not None and gate.passed and gate.source_version == 1
    assert gate.figures["top1_agreement"][1] >= 0.99 and gate.samples == 360
    assert abs(gate.figures["accuracy"][1] - gate.figures["accuracy"][0]) <= 0.005
    served = load_model(repository / "vit", Settings(device="cpu"), manifest_checks(TASKS))
    assert served.state == "ready" and served.path.name == "2"  # the highest version serves
    with TestClient(create_app(Settings(model_repository=repository))) as client:
        shown = {m["name"]: (m["version"], m["precision"]) for m in client.get("/v1/models").json()["models"]}
    assert shown == {"vit": (2, "int8"), "detr": (1, "float32")}
    assert read_manifest(repository / "vit" / "1").precision == "float32"  # the source is untouched
    assert (repository / "vit" / "2" / "attention.onnx").read_bytes() == (
        repository / "vit" / "1" / "attention.onnx"
    ).read_bytes()  # attention stays float32


def test_the_detector_quantized_keeps_its_map(repository: Path) -> None:
    manifest = quantize.quantize_model(repository, "detr")
    assert manifest.int8_gate is not None and manifest.int8_gate.passed
    full, int8 = manifest.int8_gate.figures["map"]
    assert abs(int8 - full) <= 0.01


def test_a_refused_gate_publishes_nothing_unless_forced(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantize.BOUNDS, "top1_agreement", 1.01)  # no graph can agree more than always
    with pytest.raises(ExportError, match="INT8 quality gate failed: top1_agreement"):
        quantize.quantize_model(repository, "vit")
    assert not (repository / "vit" / "2").exists()
    forced = quantize.quantize_model(repository, "vit", force=True)
    assert forced.int8_gate is not None and not forced.int8_gate.passed
    assert read_manifest(repository / "vit" / "2").int8_gate == forced.int8_gate  # recorded as failed
    with pytest.raises(ExportError, match="quantize a float32 version"):
        quantize.quantize_model(repository, "vit", version=2, to=3)


def test_an_import_is_gated_on_calibration_images(repository: Path, tmp_path: Path) -> None:
    source = repository / "vit" / "1" / "manifest.json"
    manifest = json.loads(source.read_text())
    manifest["data"] = {"source": "hugging face checkpoint", "folder": "checkpoint"}  # an import's: no held-out data
    source.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="--calibration"):
        quantize.quantize_model(repository, "vit")
    folder = tmp_path / "calibration"
    folder.mkdir()
    for i, image in enumerate(held_out_digits()[0][:40]):
        Image.fromarray(np.asarray(image)).save(folder / f"{i}.png")
    gated = quantize.quantize_model(repository, "vit", calibration=folder)
    assert gated.int8_gate is not None and gated.int8_gate.samples == 40
    assert set(gated.int8_gate.figures) == {"top1_agreement"} and gated.int8_gate.passed
