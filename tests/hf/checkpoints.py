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


def swin(folder: Path, seed: int = 4) -> Path:
    """Shifted windows of 4x4 patches over an 8x8 grid, then one 4x4 window after patch merging."""
    import torch
    from transformers import SwinConfig, SwinForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                     mlp_ratio=2.0, **_labels(6))  # fmt: skip
    model = SwinForImageClassification(cfg)
    _spread_head(model.classifier, 40.0)
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=3, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)  # fmt: skip
    return folder


def dinov2(folder: Path, registers: int = 0, seed: int = 5) -> Path:
    """DINOv2's recipe at a small scale: position embeddings for a 5x5 grid (40 px) interpolated to the
    4x4 grid of a 32 px centre crop (as facebook/dinov2-*: 37x37 for 518 px, served at 224), and
    BitImageProcessor's shortest-edge resize (36 px, bicubic) and crop."""
    import torch
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2ForImageClassification,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
    )

    torch.manual_seed(seed + registers)
    shape = {"image_size": 40, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "mlp_ratio": 2, **_labels(8)}  # fmt: skip
    if registers:
        model = Dinov2WithRegistersForImageClassification(
            Dinov2WithRegistersConfig(num_register_tokens=registers, **shape)
        )
    else:
        model = Dinov2ForImageClassification(Dinov2Config(**shape))
    _spread_head(model.classifier, 40.0)
    model.save_pretrained(folder)
    processor = BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    processor.save_pretrained(folder)
    return folder


def yolos(folder: Path, seed: int = 6) -> Path:
    """A ViT with 10 detection tokens; position embeddings for 32x32 px interpolated to each image's own
    size (YolosImageProcessor: shortest edge 64, longest 100, both floored to a multiple of 16)."""
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessorPil

    torch.manual_seed(seed)
    cfg = YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_detection_tokens=10, initializer_range=0.2, **_labels(5))  # fmt: skip
    model = YolosForObjectDetection(cfg)  # larger random weights: scores and boxes that differ by token
    with torch.no_grad():  # the detection tokens start at zero: set apart, as training would
        model.vit.embeddings.detection_tokens.normal_(0, 1)
    model.save_pretrained(folder)
    YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 100}).save_pretrained(folder)
    return folder


def conditional_detr(folder: Path, seed: int = 7) -> Path:
    """Sigmoid scores over the labels (no "no object" class)."""
    import torch
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        ConditionalDetrImageProcessorPil,
        ResNetConfig,
    )

    torch.manual_seed(seed)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])  # fmt: skip
    cfg = ConditionalDetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12,
                                init_std=0.5, **_labels(4))  # fmt: skip
    model = ConditionalDetrForObjectDetection(cfg)  # larger random weights: queries that differ
    with torch.no_grad():  # the focal-loss prior puts every score near 0.01; at 0.12, some pass a threshold
        model.class_labels_classifier.bias.fill_(-2.0)
    model.save_pretrained(folder)
    ConditionalDetrImageProcessorPil(size={"shortest_edge": 48, "longest_edge": 80}, resample=3).save_pretrained(folder)
    return folder


# embedding and zero-shot ------------------------------------------------------------------------------

WORDS = ["this", "is", "a", "photo", "of", "cat", "dog", "car", "tree", "house", "flower", "city", "temple", "sea",
         "sky", "person", "bird", "red", "street", "night"]  # fmt: skip
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3


def tokenizer(bos: bool, max_length: int) -> object:
    """A word-level tokenizer over WORDS (the `tokenizers` library), lower-cased, split on whitespace and
    punctuation, `</s>` appended (and `<s>` before, CLIP's way), wrapped as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([*SPECIAL, *WORDS, ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)  # fmt: skip


def _towers(max_positions: int) -> dict[str, object]:
    text = {"vocab_size": len(SPECIAL) + len(WORDS) + 2, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": max_positions,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}  # fmt: skip
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2}  # fmt: skip
    return {"text_config": text, "vision_config": vision}


def clip(folder: Path, seed: int = 8) -> Path:
    """CLIP with a 16-wide projection; logit_scale log(100) (a trained CLIP's), so that scores spread."""
    import math

    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(projection_dim=16, logit_scale_init_value=math.log(100), **_towers(77)))
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer(bos=True, max_length=77).save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def siglip(folder: Path, seed: int = 9) -> Path:
    """SigLIP: attention pooling (no CLS token), sigmoid scores with a bias; labels padded to 64 tokens."""
    import math

    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(**_towers(64)))
    with torch.no_grad():  # a larger scale than at init, no bias: sigmoid scores that spread around 0.5
        model.logit_scale.fill_(math.log(30.0))
        model.logit_bias.fill_(0.0)
    model.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer(bos=False, max_length=64).save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def vit_model(folder: Path, seed: int = 10) -> Path:
    """A bare ViTModel (pooler: dense + tanh over CLS)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(folder)  # fmt: skip
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def dinov2_model(folder: Path, seed: int = 11) -> Path:
    """A bare Dinov2Model, DINOv2's recipe as `dinov2` above (pooler output: the layer-normed CLS)."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(image_size=40, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             mlp_ratio=2)).save_pretrained(folder)  # fmt: skip
    processor = BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    processor.save_pretrained(folder)
    return folder
