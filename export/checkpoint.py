"""Checkpoints (nanoGPT-style): the weights with the config dataclass that rebuilds the model, the
training config, and whatever the exporter needs to know about the data and the result."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

Model = TypeVar("Model", bound=nn.Module)


def save_checkpoint(
    out: Path, model: nn.Module, config: Any, train_config: Any, seconds: float, **fields: Any
) -> dict[str, Any]:
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(config),
        "train_config": asdict(train_config),
        "training": {"seconds": round(seconds, 1), "epochs": train_config.epochs, "threads": torch.get_num_threads()},
        **fields,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return checkpoint


def load_checkpoint(path: Path, model_class: type[Model], config_class: type) -> tuple[Model, dict[str, Any]]:
    """The model rebuilt from its config, weights loaded, in eval mode; and the whole checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = model_class(config_class(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
