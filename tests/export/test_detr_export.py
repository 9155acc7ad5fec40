"""DETR export parity on a tiny random model, through the code that builds the shipped artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.detr import DETRForOnnx, inputs_for, load_data
from models.detr import DETR, DETRConfig
from service.manifest import read_manifest
from tests.conftest import TINY_DETR


def test_detr_export_manifest_and_parity(tiny_detr_repository: Path, tmp_path: Path) -> None:
    folder = tiny_detr_repository / TINY_DETR / "1"
    manifest = read_manifest(folder)
    assert manifest.task == "detection" and manifest.preprocessing.resize == "letterbox"
    assert manifest.parity.max_abs_diff <= 1e-4 and manifest.parity.batch_size != manifest.parity.traced_batch_size
    assert [o.name for o in manifest.main.outputs] == ["logits", "boxes"]
    assert {"map_onnx", "map50_onnx", "map75_onnx"} <= set(manifest.quality)

    # independently: rebuild the model from the checkpoint the fixture wrote, compare at batch 3
    checkpoint = torch.load(tiny_detr_repository.parent / "tinydetr.pt", weights_only=False)
    model = DETR(DETRConfig(**checkpoint["config"])).eval()
    model.load_state_dict(checkpoint["model"])
    _, held_out = load_data(checkpoint["source"])
    inputs = inputs_for(held_out, manifest.preprocessing)[:3]
    with torch.no_grad():
        expected = DETRForOnnx(model)(torch.from_numpy(inputs))
    session = ort.InferenceSession(str(folder / "model.onnx"))
    assert session.get_inputs()[0].shape[0] == "batch"
    for actual, reference in zip(session.run(None, {"pixel_values": inputs}), expected, strict=True):
        np.testing.assert_allclose(actual, reference.numpy(), atol=1e-4, rtol=0)


def test_attention_flag_returns_probabilities() -> None:
    cfg = DETRConfig(image_size=32, backbone_channels=[8, 16], dim=16, heads=2, encoder_layers=2, decoder_layers=2,
                     ffn_dim=32, num_queries=5)  # fmt: skip
    out = DETR(cfg).eval()(torch.randn(2, 1, 32, 32), return_attention=True, return_aux=True)
    assert out["encoder_attention"].shape == (2, 2, 2, 64, 64)
    assert out["decoder_attention"].shape == (2, 2, 2, 5, 64)
    for key in ("encoder_attention", "decoder_attention"):
        torch.testing.assert_close(out[key].sum(-1), torch.ones(out[key].shape[:-1]))
    assert len(out["aux"]) == 1 and out["boxes"].min() >= 0 and out["boxes"].max() <= 1
