"""The Image Transformer: a short run on the digits (the loss falls, the checkpoint round-trips), then
the export, whose bits per dimension is recomputed from the artifact, and generation over HTTP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import image_transformer as it
from export.checkpoint import load_checkpoint
from models.image_transformer import ImageTransformer, ImageTransformerConfig
from service.manifest import read_manifest
from service.settings import Settings
from tests.conftest import TINY_NAME, client_for
from tests.training.builders import one_thread

EPOCHS = 3
NAME = "digitgen"
CFG = ImageTransformerConfig(dim=16, heads=2, layers=1, mlp_dim=32, memory=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_repository: Path) -> tuple[Path, Path]:
    """(checkpoint, repository) after a short training and an export judged by the tiny ViT."""
    root = tmp_path_factory.mktemp("it_training")
    checkpoint, repository = root / "c.pt", root / "repository"
    with one_thread():
        it.train(
            it.source(None, seed=0), checkpoint, model_cfg=CFG, cfg=it.TrainConfig(EPOCHS, warmup_epochs=1, lr=3e-3)
        )
    it.export(checkpoint, repository, name=NAME, classifier=tiny_repository / TINY_NAME)
    return checkpoint, repository


def test_the_loss_falls_and_the_checkpoint_round_trips(run: tuple[Path, Path]) -> None:
    model, checkpoint = load_checkpoint(run[0], ImageTransformer, ImageTransformerConfig)
    losses = checkpoint["losses"]
    print(f"image transformer losses per epoch (nats/pixel): {[round(x, 3) for x in losses]}")
    assert len(losses) == EPOCHS and losses[-1] < 0.8 * losses[0]  # measured 3.08 -> 2.01
    *_, test_x, test_y = it.load_split(seed=0)
    bits = it.bits_per_dim(it.model_log_probs(model, test_x, test_y), test_x)
    # measured 2.88 after 3 epochs (uniform: log2(17) = 4.09)
    assert bits == checkpoint["quality"]["bits_per_dim"] < 3.0
    # the loss trained on is the likelihood measured: the last epoch's mean (2.006 nats) and held out (1.999)
    assert abs(bits * math.log(2) - losses[-1]) < 0.1


def test_bits_per_dim_recomputed_from_the_artifact(run: tuple[Path, Path]) -> None:
    """Not the manifest's own figure: the held-out pixels scored by the exported graph."""
    folder = run[1] / NAME / "1"
    manifest = read_manifest(folder)
    session = ort.InferenceSession(str(folder / manifest.main.file), providers=["CPUExecutionProvider"])
    *_, test_x, test_y = it.load_split(seed=0)
    logits, _ = session.run(None, {"pixels": test_x.numpy(), "labels": test_y.numpy()})
    bits = it.bits_per_dim(torch.from_numpy(logits).log_softmax(-1), test_x)
    assert bits == pytest.approx(manifest.quality["bits_per_dim_onnx"], abs=1e-5)
    assert bits == pytest.approx(manifest.quality["bits_per_dim"], abs=1e-4)


def test_the_exported_model_generates_over_http(run: tuple[Path, Path]) -> None:
    for client in client_for(Settings(model_repository=run[1], device="cpu")):
        response = client.post("/v1/generate", json={"model": NAME, "label": "3", "num_images": 2, "seed": 1})
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 2


def test_no_image_size_for_the_digits_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="8x8 grey"):
        it.train(it.source(None, 0), tmp_path / "c.pt", image_size=16)
    assert not np.any([p.exists() for p in tmp_path.iterdir()])
