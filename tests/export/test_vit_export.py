"""Export parity on a tiny random ViT, through the same code that builds the shipped artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import onnx_export, vit
from export.onnx_export import PARITY_BATCH, TRACED_BATCH, ExportError
from models.vit import ViT, ViTConfig
from service.imaging import preprocess
from service.manifest import read_manifest
from tests.conftest import TINY_NAME, tiny_checkpoint
from tests.helpers import held_out_digits


def test_export_writes_a_parity_checked_manifest(tiny_repository: Path) -> None:
    manifest = read_manifest(tiny_repository / TINY_NAME / "1")
    assert manifest.parity.batch_size != manifest.parity.traced_batch_size
    assert manifest.parity.max_abs_diff <= 1e-4 and manifest.parity.argmax_equal
    assert manifest.labels == [str(d) for d in range(10)]
    assert set(manifest.versions) >= {"torch", "onnx", "onnxruntime"}
    assert manifest.data["held_out"] >= 250


def test_onnx_matches_pytorch_at_untraced_batch_sizes(tiny_repository: Path, tmp_path: Path) -> None:
    """Independent of the exporter's own check: rebuild the model and compare at batch 1 and 45."""
    checkpoint = torch.load(tiny_checkpoint(tmp_path / "t.pt"), weights_only=False)
    model = ViT(ViTConfig(**checkpoint["config"])).eval()
    model.load_state_dict(checkpoint["model"])
    manifest = read_manifest(tiny_repository / TINY_NAME / "1")
    session = ort.InferenceSession(str(tiny_repository / TINY_NAME / "1" / "model.onnx"))
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic axis, not a baked-in size
    images, _ = held_out_digits()
    inputs = np.stack([preprocess(img, manifest.preprocessing) for img in images[:46]])
    for batch in (inputs[:1], inputs[1:]):
        assert len(batch) != TRACED_BATCH
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        (actual,) = session.run(None, {"pixel_values": batch})
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_export_refuses_an_artifact_that_fails_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_export.run_batched

    def drifting(*args: object, **kwargs: object) -> list[np.ndarray]:
        outputs = real(*args, **kwargs)  # type: ignore[arg-type]
        outputs[0][PARITY_BATCH + 1, 0] += 1e-3  # one logit of one image in the second chunk drifts
        return outputs

    monkeypatch.setattr(onnx_export, "run_batched", drifting)
    with pytest.raises(ExportError, match="parity failed"):
        vit.export(tiny_checkpoint(tmp_path / "t.pt"), tmp_path / "repo", name="bad")
    assert not (tmp_path / "repo" / "bad").exists()
