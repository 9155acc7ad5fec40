"""ViT on a tiny ImageFolder through `python -m export --data`: the loss falls, the checkpoint
round-trips, the export serves over HTTP, and no existing model is overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export import reproduce, vit
from export.__main__ import main
from export.checkpoint import load_checkpoint
from export.onnx_export import ExportError, publish
from models.vit import ViT, ViTConfig
from service.imaging import preprocess
from service.manifest import read_manifest
from service.settings import Settings
from tests.conftest import client_for
from tests.helpers import png_bytes
from tests.training.builders import image_folder, one_thread

EPOCHS = 6
NAME = "colours"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data folder, checkpoint, repository) after `python -m export vit --data ... --name ...`."""
    root = tmp_path_factory.mktemp("vit_training")
    folder, repository, checkpoint = image_folder(root / "data", size=(28, 24)), root / "repository", root / "c.pt"
    argv = ["vit", "--data", str(folder), "--name", NAME, "--epochs", str(EPOCHS)]
    with one_thread():
        main([*argv, "--repository", str(repository), "--checkpoint", str(checkpoint)])
    return folder, checkpoint, repository


def test_the_loss_falls_and_the_checkpoint_round_trips(run: tuple[Path, Path, Path]) -> None:
    folder, path, _ = run
    model, checkpoint = load_checkpoint(path, ViT, ViTConfig)
    losses = checkpoint["losses"]
    print(f"vit losses per epoch: {[round(x, 3) for x in losses]}")
    assert len(losses) == EPOCHS and losses[-1] < 0.5 * losses[0]  # measured 1.29 -> 0.31
    # the size and channels came from the data: short side 24, colour
    assert (model.config.image_size, model.config.patch_size, model.config.in_channels) == (24, 3, 3)
    held_out = vit.load_data(checkpoint["source"]).held_out
    spec = vit.Preprocessing.model_validate(checkpoint["preprocessing"])
    inputs = torch.from_numpy(np.stack([preprocess(img, spec) for img in held_out.images]))
    assert vit.top1(vit.predict(model, inputs), held_out.labels) == checkpoint["quality"]["top1"] == 1.0


def test_the_exported_model_answers_over_http(run: tuple[Path, Path, Path]) -> None:
    _, _, repository = run
    manifest = read_manifest(repository / NAME / "1")
    assert manifest.labels == ["blue", "green", "red"] and manifest.preprocessing.color_mode == "RGB"
    assert manifest.preprocessing.size == (24, 24) and "seconds" not in manifest.training
    red = Image.new("RGB", (40, 30), (210, 30, 50))
    for client in client_for(Settings(model_repository=repository, device="cpu")):
        response = client.post(
            f"/v1/classify?model={NAME}", content=png_bytes(red), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0][0]["label"] == "red"


def test_an_existing_version_is_refused_without_force(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    folder, checkpoint, repository = run
    manifest = repository / NAME / "1" / "manifest.json"
    before = manifest.read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(["vit", "--data", str(folder), "--name", NAME, "--repository", str(repository)])
    with pytest.raises(ExportError, match="exists; pass --force"):
        vit.export(checkpoint, repository, name=NAME)
    assert manifest.read_bytes() == before
    staged = shutil.copytree(manifest.parent, tmp_path / NAME / "1")
    manifest.write_text("stale")
    publish(read_manifest(staged), staged, repository, force=True)
    assert manifest.read_bytes() == before  # replaced


def test_data_needs_a_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["vit", "--data", str(tmp_path), "--repository", str(tmp_path / "repository")])
    assert exit_info.value.code == 2 and "--data needs --name" in capsys.readouterr().err
    assert not (tmp_path / "repository").exists()


def test_augmentation_warps_and_inverts_as_configured() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=gen)
    still = vit.TrainConfig(warp_prob=0.0, invert_prob=0.0)
    torch.testing.assert_close(vit.augment(x, still, gen), x, atol=1e-5, rtol=0)
    inverted = vit.augment(x, vit.TrainConfig(warp_prob=0.0, invert_prob=1.0), gen)
    torch.testing.assert_close(inverted, 1 - x, atol=1e-5, rtol=0)
    warped = vit.augment(x, vit.TrainConfig(warp_prob=1.0, invert_prob=0.0), gen)
    assert warped.shape == x.shape and (warped - x).abs().mean() > 0.05


def test_reproduce_retrains_to_the_manifest_figures(run: tuple[Path, Path, Path]) -> None:
    """Same data, configs, seed and thread count (the manifest's): the same figures, exactly."""
    rows = reproduce.main(["vit", "--repository", str(run[2]), "--name", NAME])
    assert {r["figure"] for r in rows} == {"top1", "top1_upscaled_nearest"}
    assert all(r["within"] and r["retrained"] == r["manifest"] for r in rows)


def test_reproduce_flags_a_figure_outside_the_tolerance() -> None:
    rows = reproduce.compare({"top1": 0.95, "map": 0.5}, {"top1": 0.93, "bits": 1.0}, tolerance=0.01)
    assert rows == [{"figure": "top1", "manifest": 0.95, "retrained": 0.93, "within": False}]


def test_training_twice_on_one_thread_gives_the_same_weights(tmp_path: Path) -> None:
    """Bit for bit at a fixed seed and thread count (another thread count sums in another order)."""
    folder = image_folder(tmp_path / "data", per_class=5, size=(16, 16))
    cfg, model_cfg = vit.TrainConfig(epochs=2), ViTConfig(image_size=16, patch_size=4, in_channels=3, num_classes=3,
                                                          dim=16, depth=1, heads=2, mlp_dim=32)  # fmt: skip
    with one_thread():
        first, second = (vit.train(vit.source(folder, 0), tmp_path / f"{i}.pt", model_cfg, cfg) for i in range(2))
    assert first["model"].keys() == second["model"].keys()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


def test_input_size_and_channels_from_the_options(tmp_path: Path) -> None:
    data = vit.load_image_folder(image_folder(tmp_path / "data", per_class=5, size=(40, 40)))
    assert (vit.model_config(data).image_size, vit.model_config(data).in_channels) == (40, 3)
    grey = vit.model_config(data, image_size=64, channels=1)
    assert (grey.image_size, grey.patch_size, grey.in_channels, grey.num_classes) == (64, 8, 1, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        vit.model_config(data, image_size=30)
