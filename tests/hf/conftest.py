"""Tiny Hugging Face checkpoints (ViT, DeiT, DeiT with teacher, BEiT, Swin, DINOv2 with and without
registers; DETR, YOLOS, Conditional DETR) imported by `export.hf` into one temporary repository, served
by a real `python -m service` process, and transformers' own pipelines over the same folders to compare with."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.settings import PROJECT_ROOT
from tests.e2e.conftest import running_server
from tests.hf import checkpoints

pytest.importorskip("transformers")

MAKERS: dict[str, Callable[[Path], Path]] = {
    "hfvit": checkpoints.vit,
    "hfdeit": checkpoints.deit,
    "hfdeitteacher": lambda folder: checkpoints.deit(folder, teacher=True),
    "hfdetr": checkpoints.detr,
    "hfbeit": checkpoints.beit,
    "hfswin": checkpoints.swin,
    "hfdinov2": checkpoints.dinov2,
    "hfdinov2reg": lambda folder: checkpoints.dinov2(folder, registers=2),
    "hfyolos": checkpoints.yolos,
    "hfcondetr": checkpoints.conditional_detr,
}
CLASSIFIERS = ["hfvit", "hfdeit", "hfdeitteacher", "hfbeit", "hfswin", "hfdinov2", "hfdinov2reg"]
DETECTORS = ["hfdetr", "hfyolos", "hfcondetr"]


def made(factory: pytest.TempPathFactory, makers: dict[str, Callable[[Path], Path]]) -> dict[str, Path]:
    root = factory.mktemp("hf_checkpoints")
    return {name: make(root / name) for name, make in makers.items()}


def imported(factory: pytest.TempPathFactory, folders: dict[str, Path], by_command_line: str) -> Path:
    """Every folder imported into a repository of its own: `by_command_line` by the real command
    line, the others in-process."""
    from export import hf

    repository = factory.mktemp("hf_repository")
    for name, folder in folders.items():
        if name == by_command_line:
            command = [sys.executable, "-m", "export.hf", str(folder), "--name", name, "--repository", str(repository)]
            done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            hf.main([str(folder), "--name", name, "--repository", str(repository)])
    return repository


@contextmanager
def serving(factory: pytest.TempPathFactory, repository: Path) -> Iterator[str]:
    with running_server(factory.mktemp("hf_server"), VITSERVE_MODEL_REPOSITORY=str(repository)) as running:
        yield running.url


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return made(tmp_path_factory, MAKERS)


@pytest.fixture(scope="session")
def hf_repository(tmp_path_factory: pytest.TempPathFactory, hf_folders: dict[str, Path]) -> Path:
    return imported(tmp_path_factory, hf_folders, by_command_line="hfdeitteacher")


@pytest.fixture(scope="session")
def hf_server(tmp_path_factory: pytest.TempPathFactory, hf_repository: Path) -> Iterator[str]:
    with serving(tmp_path_factory, hf_repository) as url:
        yield url


@pytest.fixture(scope="session")
def hf_pipelines(hf_folders: dict[str, Path]) -> dict[str, Any]:
    """transformers' own pipelines over the same local folders (PIL image processors: no torchvision)."""
    from transformers import AutoImageProcessor, pipeline

    pipes = {}
    for name, folder in hf_folders.items():
        task = "object-detection" if name in DETECTORS else "image-classification"
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        pipes[name] = pipeline(task, model=str(folder), image_processor=processor, device="cpu")
    return pipes


# embedding and zero-shot: a repository and server of their own (their tests need no other model)

EMBED_MAKERS: dict[str, Callable[[Path], Path]] = {
    "hfclip": checkpoints.clip,
    "hfsiglip": checkpoints.siglip,
    "hfvitmodel": checkpoints.vit_model,
    "hfdinov2model": checkpoints.dinov2_model,
}
ZERO_SHOT = ["hfclip", "hfsiglip"]


@pytest.fixture(scope="session")
def embed_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return made(tmp_path_factory, EMBED_MAKERS)


@pytest.fixture(scope="session")
def embed_repository(tmp_path_factory: pytest.TempPathFactory, embed_folders: dict[str, Path]) -> Path:
    return imported(tmp_path_factory, embed_folders, by_command_line="hfclip")


@pytest.fixture(scope="session")
def embed_server(tmp_path_factory: pytest.TempPathFactory, embed_repository: Path) -> Iterator[str]:
    with serving(tmp_path_factory, embed_repository) as url:
        yield url
