"""A model family trained here, as one object: its model and configs, where its data comes from, what a
training run of it is and what its exported graphs are. Training (export/training.py's shared loop) and
export (refuse an existing version, stage, write the manifest, publish) are the same for every family.
Each family module declares its FAMILY; export/families.py registers it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from export.checkpoint import load_checkpoint
from export.onnx_export import manifest_for, publish, require_free, staging
from export.training import Training, train_and_save
from service.manifest import GraphSpec, Manifest, Parity, Preprocessing


@dataclass(frozen=True)
class InputShape:
    """The model input's side and channels as asked for (`--image-size`, `--channels`); None: from the data."""

    image_size: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class Artifact:
    """A family's graphs, written and parity-checked in the staging folder, and what the manifest says of them."""

    graphs: dict[str, GraphSpec]
    preprocessing: Preprocessing
    parity: Parity
    quality: dict[str, float]  # measured on the exported graphs, beside the checkpoint's own figures


def no_export_options(repository: Path) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TrainedFamily:
    """One family trained here (export/hf.py's Family is an architecture imported from transformers)."""

    name: str  # what `python -m export NAME` takes; the default name in the repository and under runs/
    model_class: type[nn.Module]
    model_config: type  # a dataclass: rebuilds the model from a checkpoint's or a manifest's `config`
    train_config: type  # a dataclass with at least the fields export.training.LoopConfig names
    data_help: str  # what `--data DIR` takes
    task: str  # the manifest's task (service.manifest: CLASSIFICATION, DETECTION, GENERATION)
    architecture: str  # the manifest's architecture
    # `--data DIR` (or None) and the seed -> the data source the checkpoint and manifest record
    source: Callable[[Path | None, int], dict[str, Any]]
    # (source, model config or None for one from the data, train config, input shape) -> the run
    prepare: Callable[[dict[str, Any], Any, Any, InputShape], Training]
    # (model, checkpoint, staging folder, **export options) -> the graphs written there, parity-checked
    write_artifact: Callable[..., Artifact]
    # the repository published to -> the export options it implies (a judge published beside it, say)
    export_options: Callable[[Path], dict[str, Any]] = field(default=no_export_options)

    def train(
        self,
        source: dict[str, Any],
        out: Path,
        model_cfg: Any = None,
        cfg: Any = None,
        image_size: int | None = None,
        channels: int | None = None,
    ) -> dict[str, Any]:
        """Train on `source` (configs default to the family's own) and save the checkpoint to `out`; returns it."""
        training = self.prepare(source, model_cfg, cfg or self.train_config(), InputShape(image_size, channels))
        return train_and_save(out, self.model_class, training, desc=self.name)

    def export(
        self,
        checkpoint_path: Path,
        repository: Path,
        name: str | None = None,
        version: int = 1,
        force: bool = False,
        **options: Any,
    ) -> Manifest:
        """Export a checkpoint to `repository/name/version/` (name: the family's), only if it passes parity;
        `options` go to write_artifact, over the defaults export_options(repository) gives."""
        name = name or self.name
        require_free(repository, name, version, force)  # before the work, not after it
        model, checkpoint = load_checkpoint(checkpoint_path, self.model_class, self.model_config)
        with staging(name, version) as staged:
            artifact = self.write_artifact(model, checkpoint, staged, **{**self.export_options(repository), **options})
            manifest = manifest_for(
                checkpoint, name=name, version=version, task=self.task, architecture=self.architecture,
                graphs=artifact.graphs, preprocessing=artifact.preprocessing, quality=artifact.quality,
                parity=artifact.parity,
            )  # fmt: skip
            publish(manifest, staged, repository, force)
        return manifest
