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
    folder = shutil.copytree(hf_folders["hfvit"], tmp_path / "convnext")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ConvNextForImageClassification"]}))
    message = run_import(folder, tmp_path / "repository", capsys)
    assert "unsupported architecture ConvNextForImageClassification" in message
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


@pytest.mark.parametrize("damage", ["missing tensor", "tensor of another shape"])
def test_weights_that_do_not_match_the_config_are_refused(
    tmp_path: Path, hf_folders: dict[str, Path], capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """transformers only warns, and fills the gap with random weights; the importer refuses, by name."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(hf_folders["hfdinov2"], tmp_path / "mismatched")
    weights = load_file(folder / "model.safetensors")
    if damage == "missing tensor":
        del weights["classifier.weight"]
    else:
        weights["classifier.weight"] = torch.zeros(3, weights["classifier.weight"].shape[1])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    message = run_import(folder, tmp_path / "repository", capsys)
    assert "weights do not match its config.json" in message and "classifier.weight" in message
    expected = "missing from the weights file" if damage == "missing tensor" else "[3, 64] in the file, [8, 64]"
    assert expected in message
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize(
    ("model", "setting", "expected"),
    [
        ("hfvit", {"resample": 5}, "resample=5 is not supported; supported filters: 0 (nearest)"),
        ("hfvit", {"do_resize": False}, "do_resize=False: the service always resizes"),
        ("hfdetr", {"size": {"max_height": 64, "max_width": 64}}, "supported: height and width, or shortest_edge"),
        ("hfdetr", {"pad_size": {"height": 128, "width": 128}}, "padding to a fixed pad_size"),
        ("hfdinov2", {"do_center_crop": False}, "needs a centre crop"),
    ],
)
def test_processor_settings_the_manifest_cannot_express_are_refused(
    tmp_path: Path,
    hf_folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    model: str,
    setting: dict[str, object],
    expected: str,
) -> None:
    folder = shutil.copytree(hf_folders[model], tmp_path / "processor")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **setting}))
    message = run_import(folder, tmp_path / "repository", capsys)
    assert expected in message, message
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


def test_new_families_manifests(hf_repository: Path) -> None:
    """DINOv2's registers count among the prefix tokens; BitImageProcessor's shortest edge and crop; YOLOS's
    sizes floored to a multiple of 16; Conditional DETR's sigmoid scores (as many logits as labels); Swin
    without an attention graph, saying why."""
    from service.manifest import check_detection, read_manifest

    dinov2, registers = (read_manifest(hf_repository / name / "1") for name in ("hfdinov2", "hfdinov2reg"))
    assert (dinov2.prefix_tokens, registers.prefix_tokens) == (1, 3)
    spec = registers.preprocessing
    assert (spec.resize, spec.shortest_edge, spec.crop, spec.resample) == ("shortest_edge", 36, (32, 32), "bicubic")
    assert registers.graphs["attention"].outputs[1].shape == ["batch", 2, 2, 19, 19]  # CLS, 2 registers, 16 patches
    yolos = read_manifest(hf_repository / "hfyolos" / "1")
    assert (yolos.preprocessing.size_multiple, yolos.feature_stride, yolos.score_activation) == (16, 8, "softmax")
    condetr = read_manifest(hf_repository / "hfcondetr" / "1")
    assert condetr.score_activation == "sigmoid" and condetr.main.outputs[0].shape == ["batch", 12, 4]
    assert len(condetr.labels) == 4
    with pytest.raises(ValueError, match="softmax scoring needs 4 labels \\+ no object"):
        check_detection(condetr.model_copy(update={"score_activation": "softmax"}))
    swin = read_manifest(hf_repository / "hfswin" / "1")
    assert list(swin.graphs) == ["main"] and "shifted local windows" in swin.absent_graphs["attention"]


def test_a_checkpoint_that_fails_to_export_is_one_clear_line(
    tmp_path: Path, hf_folders: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers itself failing on a checkpoint (a real-size YOLOS whose image size is no multiple of
    its patch, with mid position embeddings, cannot run in transformers either): one line, exit 2."""

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape '[11, 192, 50, 83]' is invalid for input of size 8796480")

    monkeypatch.setattr(hf, "export_checkpoint", fails)
    message = run_import(hf_folders["hfvit"], tmp_path / "repository", capsys)
    assert message == (f"error: {hf_folders['hfvit']} could not be exported: RuntimeError: shape '[11, 192, 50, 83]' "
                       "is invalid for input of size 8796480; nothing was written\n")  # fmt: skip
    assert not (tmp_path / "repository").exists()
