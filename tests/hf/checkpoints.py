"""Tiny random-weight Hugging Face checkpoints, made with transformers' own classes and saved as a user's
folder would be (config.json, model.safetensors, preprocessor_config.json). No network."""

from __future__ import annotations

from pathlib import Path


def _labels(n: int) -> dict[str, object]:
    names = ["tabby cat", "pagoda", "sea lion", "daisy", "steam locomotive", "volcano", "teapot", "umbrella"]
    id2label = {i: names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(n)}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _spread_head(head: object, scale: float) -> None:
    """Random tiny models give near-uniform scores; a larger head spreads them, so that the order of
    labels is a meaningful thing to compare."""
    import torch

    with torch.no_grad():
        head.weight.mul_(scale)  # type: ignore[attr-defined]


def vit(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, **_labels(7))  # fmt: skip
    model = ViTForImageClassification(cfg)
    _spread_head(model.classifier, 40.0)
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def deit(folder: Path, teacher: bool = False, seed: int = 1) -> Path:
    import torch
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        DeiTImageProcessorPil,
    )

    torch.manual_seed(seed)
    cfg = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, **_labels(6))  # fmt: skip
    model = (DeiTForImageClassificationWithTeacher if teacher else DeiTForImageClassification)(cfg)
    for head in [model.cls_classifier, model.distillation_classifier] if teacher else [model.classifier]:
        _spread_head(head, 40.0)
    model.save_pretrained(folder)
    # DeiT's recipe: resize to 36x36 (bicubic), centre crop 32x32
    DeiTImageProcessorPil(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def beit(folder: Path, seed: int = 3) -> Path:
    import torch
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessorPil

    torch.manual_seed(seed)
    cfg = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, use_relative_position_bias=True, **_labels(5))  # fmt: skip
    model = BeitForImageClassification(cfg)
    _spread_head(model.classifier, 40.0)
    model.save_pretrained(folder)
    BeitImageProcessorPil(size={"height": 32, "width": 32}, resample=3).save_pretrained(folder)
    return folder


def detr(folder: Path, seed: int = 2) -> Path:
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    torch.manual_seed(seed)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])  # fmt: skip
    cfg = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12, **_labels(5))  # fmt: skip
    model = DetrForObjectDetection(cfg)
    # random queries all look alike; sharper cross-attention and larger heads set them apart
    _spread_head(model.class_labels_classifier, 30.0)
    _spread_head(model.bbox_predictor.layers[-1], 30.0)
    _spread_head(model.model.query_position_embeddings, 30.0)
    for layer in model.model.decoder.layers:
        _spread_head(layer.encoder_attn.q_proj, 30.0)
        _spread_head(layer.encoder_attn.k_proj, 30.0)
    model.save_pretrained(folder)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 100}).save_pretrained(folder)
    return folder


def imagegpt(folder: Path, seed: int = 4) -> Path:
    """An 8x8 ImageGPT over 16 random colour clusters. n_positions is 65, one more than the pixels
    (OpenAI's checkpoints have exactly the pixel count), so that transformers' loss over SOS + every
    pixel can be had in one call to compare scores with."""
    import numpy as np
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessorPil

    torch.manual_seed(seed)
    clusters = np.random.default_rng(seed).uniform(-1, 1, (16, 3)).round(4)
    cfg = ImageGPTConfig(vocab_size=17, n_positions=65, n_embd=32, n_layer=2, n_head=2)
    model = ImageGPTForCausalImageModeling(cfg)
    _spread_head(model.lm_head, 10.0)  # likelier tokens stand out: greedy decoding meets no near-ties
    model.save_pretrained(folder)
    ImageGPTImageProcessorPil(clusters=clusters, size={"height": 8, "width": 8}).save_pretrained(folder)
    return folder
