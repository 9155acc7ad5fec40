"""Fixtures: a tiny random-weight ViT exported through the real export path into a temp repository."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import PROJECT_ROOT, Settings

SHIPPED_REPOSITORY = PROJECT_ROOT / "model_repository"
TINY_NAME = "tiny"


def tiny_checkpoint(path: Path) -> Path:
    import torch

    from export.data import load_digits_data
    from export.vit import TrainConfig
    from models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32)
    data = load_digits_data(seed=0)
    torch.save(
        {
            "model": ViT(cfg).state_dict(),
            "config": asdict(cfg),
            "train_config": asdict(TrainConfig(epochs=0)),
            "preprocessing": {"color_mode": "L", "size": [16, 16], "mean": [0.2], "std": [0.3]},
            "labels": data.classes,
            "source": {"kind": "digits", "seed": 0},
            "data": data.description,
            "quality": {"top1": 0.1},
            "training": {"seconds": 0.0, "epochs": 0},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tmp>/tiny/1/` exported by export.vit.export (parity-checked) from random weights."""
    from export import vit

    root = tmp_path_factory.mktemp("repository")
    vit.export(tiny_checkpoint(root.parent / "tiny.pt"), root, name=TINY_NAME)
    return root


TINY_DETR = "tinydetr"


def tiny_detr_checkpoint(path: Path, scenes: Path) -> Path:
    import torch

    from export.detr import TrainConfig
    from export.scenes import write_scenes
    from models.detr import DETR, DETRConfig

    write_scenes(scenes, train=4, held_out=40, seed=0)
    torch.manual_seed(0)
    cfg = DETRConfig(image_size=32, backbone_channels=[8, 16], dim=16, heads=2, encoder_layers=1,
                     decoder_layers=1, ffn_dim=32, num_queries=5)  # fmt: skip
    torch.save(
        {
            "model": DETR(cfg).state_dict(),
            "config": asdict(cfg),
            "train_config": asdict(TrainConfig(epochs=0)),
            "preprocessing": {"color_mode": "L", "size": [32, 32], "resize": "letterbox", "mean": [0.1], "std": [0.2]},
            "labels": [str(d) for d in range(10)],
            "source": {"kind": "scenes", "path": str(scenes), "seed": 0},
            "data": {"name": "tiny scenes"},
            "quality": {},
            "training": {"seconds": 0.0, "epochs": 0},
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def tiny_detr_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tmp>/tinydetr/1/` exported by export.detr.export from random weights."""
    from export import detr

    root = tmp_path_factory.mktemp("detr_repository")
    checkpoint = tiny_detr_checkpoint(root.parent / "tinydetr.pt", root.parent / "scenes")
    detr.export(checkpoint, root, name=TINY_DETR)
    return root


TINY_GENERATOR = "tinygen"


@pytest.fixture(scope="session")
def tiny_generator_repository(tmp_path_factory: pytest.TempPathFactory, tiny_repository: Path) -> Path:
    """`<tmp>/tinygen/1/` exported by export.image_transformer.export from random weights."""
    import torch

    from export import image_transformer
    from models.image_transformer import ImageTransformer, ImageTransformerConfig

    root = tmp_path_factory.mktemp("generator_repository")
    torch.manual_seed(0)
    cfg = ImageTransformerConfig(dim=16, heads=2, layers=2, mlp_dim=32, memory=10)
    checkpoint = root.parent / "tinygen.pt"
    torch.save(
        {
            "model": ImageTransformer(cfg).state_dict(),
            "config": asdict(cfg),
            "train_config": asdict(image_transformer.TrainConfig(epochs=0)),
            "labels": [str(d) for d in range(10)],
            "source": {"kind": "digits", "seed": 0},
            "data": {"name": "digits"},
            "quality": {},
            "training": {"seconds": 0.0, "epochs": 0},
        },
        checkpoint,
    )
    image_transformer.export(checkpoint, root, name=TINY_GENERATOR, classifier=tiny_repository / TINY_NAME)
    return root


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def client_for(settings: Settings) -> Iterator[TestClient]:
    app: FastAPI = create_app(settings)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The app over the shipped model repository."""
    yield from client_for(Settings(model_repository=SHIPPED_REPOSITORY, device="cpu"))
