from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.manifest import Manifest
from service.manifest import check_classification as check_manifest


def manifest_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "vit",
        "version": 1,
        "task": "classification",
        "architecture": "vit",
        "graphs": {
            "main": {
                "file": "model.onnx",
                "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 1, 32, 32]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
            }
        },
        "preprocessing": {"color_mode": "L", "size": [32, 32], "mean": [0.5], "std": [0.25]},
        "labels": ["x", "y", "z"],
        "data": {"name": "test"},
        "quality": {"top1": 0.9},
        "parity": {
            "max_abs_diff": 1e-6,
            "tolerance": 1e-4,
            "batch_size": 37,
            "traced_batch_size": 2,
            "argmax_equal": True,
        },
        "opset": 18,
        "versions": {"torch": "x"},
    }
    return {**base, **overrides}


def test_a_complete_manifest_validates() -> None:
    manifest = Manifest.model_validate(manifest_dict())
    assert manifest.main.inputs[0].shape == ["batch", 1, 32, 32]
    check_manifest(manifest)


@pytest.mark.parametrize(
    "overrides",
    [
        {"graphs": {}},
        {"preprocessing": {"color_mode": "RGB", "size": [32, 32], "mean": [0.5], "std": [0.25]}},
        {"preprocessing": {"color_mode": "L", "size": [32, 32], "mean": [0.5], "std": [0.0]}},
        {"version": 0},
        {"surprise": True},
        {"labels": "xyz"},
    ],
    ids=["no-main-graph", "channels-mismatch", "zero-std", "version-0", "unknown-key", "labels-not-list"],
)
def test_invalid_manifests_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_dict(**overrides))


def test_classification_needs_one_logit_per_label() -> None:
    manifest = Manifest.model_validate(manifest_dict(labels=["x", "y"]))
    with pytest.raises(ValueError, match="3 logits but there are 2 labels"):
        check_manifest(manifest)
