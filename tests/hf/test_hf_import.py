"""`python -m export.hf` refuses what it cannot import with a clear message, and writes nothing then."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export import hf


def run_import(folder: Path, repository: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        hf.main([str(folder), "--name", "imported", "--repository", str(repository), *extra])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_unsupported_architecture_names_the_supported_ones(
    tmp_path: Path, hf_folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(hf_folders["hfvit"], tmp_path / "swin")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["SwinForImageClassification"]}))
    message = run_import(folder, tmp_path / "repository", capsys)
    assert "unsupported architecture SwinForImageClassification" in message
    for name in hf.SUPPORTED:
        assert name in message
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "no preprocessor config", "broken config"])
def test_corrupt_folder_is_a_clear_error_and_writes_nothing(
    tmp_path: Path, hf_folders: dict[str, Path], capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    folder = shutil.copytree(hf_folders["hfvit"], tmp_path / "broken")
    weights = folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no weights":
        weights.unlink()
    elif damage == "no preprocessor config":
        (folder / "preprocessor_config.json").unlink()
    else:
        (folder / "config.json").write_text("{not json")
    message = run_import(folder, tmp_path / "repository", capsys)
    assert message.startswith("error: ") and str(folder) in message
    assert "Traceback" not in message
    assert not (tmp_path / "repository").exists()


def test_an_existing_version_is_not_replaced_without_force(
    tmp_path: Path, hf_folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "repository" / "imported" / "1"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    message = run_import(hf_folders["hfvit"], tmp_path / "repository", capsys)
    assert "--force" in message
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_manifest_states_the_recipe(hf_repository: Path) -> None:
    from service.manifest import read_manifest

    deit = read_manifest(hf_repository / "hfdeitteacher" / "1")
    assert deit.architecture == "DeiTForImageClassificationWithTeacher" and deit.prefix_tokens == 2
    spec = deit.preprocessing
    assert (spec.resize, spec.stretch_to, spec.crop, spec.size, spec.resample) == (
        "stretch", (36, 36), (32, 32), (32, 32), "bicubic"
    )  # fmt: skip
    assert not spec.reduced_decode and deit.versions["transformers"]
    detr = read_manifest(hf_repository / "hfdetr" / "1")
    assert (detr.preprocessing.resize, detr.preprocessing.shortest_edge, detr.preprocessing.longest_edge) == (
        "shortest_edge", 64, 100
    )  # fmt: skip
    assert detr.feature_stride == 8 and detr.main.inputs[0].shape == ["batch", 3, "height", "width"]
    for manifest in (deit, detr):
        assert manifest.parity.max_abs_diff <= manifest.parity.tolerance
        assert manifest.data["preprocessing_max_abs_diff"] <= hf.PREPROCESSING_TOLERANCE
