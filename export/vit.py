"""ViT: train on digits (or an ImageFolder), evaluate held-out top-1, export to ONNX with parity."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from export.data import LabelledData, Split, load_digits_data, load_image_folder
from export.family import Artifact, InputShape, TrainedFamily
from export.onnx_export import (
    PARITY_BATCH,
    Compared,
    check_parity,
    export_image_graph,
    require_parity,
    torch_outputs,
)
from export.training import Step, Training, warmup_cosine
from models.vit import ViT, ViTConfig
from service.imaging import normalize, preprocess, to_unit_array
from service.manifest import CLASSIFICATION, GraphSpec, Preprocessing, TensorSpec


@dataclass
class TrainConfig:
    """AdamW, linear warm-up then cosine decay, label smoothing; random affine warps and inversion."""

    epochs: int = 120
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    max_rotation_deg: float = 12.0
    max_shift: float = 0.12  # fraction of the image
    scale_range: tuple[float, float] = (0.85, 1.1)
    warp_prob: float = 0.75  # the rest are seen unwarped (blocky upscaled digits must be seen pixel-aligned)
    invert_prob: float = 0.5  # polarity-invariance for digits (light-on-dark and dark-on-light); 0 for folders
    seed: int = 0


def source(data: Path | None, seed: int) -> dict[str, Any]:
    """The training data: digits, or an ImageFolder (`DIR/<class>/<image>`)."""
    return {"kind": "folder", "path": str(data.resolve()), "seed": seed} if data else {"kind": "digits", "seed": seed}


def load_data(source: dict[str, Any]) -> LabelledData:
    """`{"kind": "digits", "seed": 0}` or `{"kind": "folder", "path": ..., "seed": 0}`."""
    if source["kind"] == "folder":
        return load_image_folder(Path(source["path"]), seed=source["seed"])
    return load_digits_data(seed=source["seed"])


def unit_tensor(split: Split, spec: Preprocessing, upscale: Image.Resampling | None = None) -> torch.Tensor:
    """Images -> `[N, C, H, W]` in [0, 1], resized by the service's own code. With `upscale`, each
    image smaller than the model input is first enlarged 4x with that filter, as a user might have
    done before uploading it (a blocky nearest-neighbour digit looks nothing like a smooth one)."""

    def view(img: Image.Image) -> Image.Image:
        if upscale is None or img.height >= spec.size[0]:
            return img
        return img.resize((4 * img.width, 4 * img.height), upscale)

    return torch.from_numpy(np.stack([to_unit_array(view(img), spec) for img in split.images]))


# the views of each training image: as it is, and blocky-upscaled
UPSCALE_VIEWS = {"native": None, "upscaled_nearest": Image.Resampling.NEAREST}


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and shift (one affine warp per image, or none), then random inversion."""
    n = x.shape[0]
    uniform = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=gen)  # noqa: E731
    warp = (torch.rand(n, generator=gen) < cfg.warp_prob).float()
    angle = uniform(-1, 1) * math.radians(cfg.max_rotation_deg) * warp
    scale = 1 + (uniform(*cfg.scale_range) - 1) * warp
    shift = uniform(-cfg.max_shift, cfg.max_shift, 2) * 2 * warp[:, None]  # affine_grid spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    warped = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    invert = (torch.rand(n, 1, 1, 1, generator=gen) < cfg.invert_prob).float()
    return warped + invert * (1 - 2 * warped)


@torch.no_grad()
def predict(model: ViT, inputs: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def model_config(data: LabelledData, image_size: int | None = None, channels: int | None = None) -> ViTConfig:
    """The input side is the median short side of the images (16 to 128, a multiple of 8) and RGB if
    any image is in colour; options override either. The patch grid stays 8x8, so the cost does not grow with size."""
    if image_size is None:
        sides = [min(img.size) for img in data.train.images]
        image_size = int(np.clip(np.median(sides), 16, 128)) // 8 * 8
    if image_size % 8 or image_size < 8:
        raise ValueError(f"--image-size {image_size}: a multiple of 8 (the patch grid is 8x8)")
    if channels is None:
        channels = 3 if any(img.mode == "RGB" for img in data.train.images) else 1
    return ViTConfig(image_size=image_size, patch_size=image_size // 8, in_channels=channels,
                     num_classes=len(data.classes))  # fmt: skip


def prepare(source: dict[str, Any], model_cfg: ViTConfig | None, cfg: TrainConfig, shape: InputShape) -> Training:
    """The training images in each of UPSCALE_VIEWS, normalised by their own mean and std; held-out top-1."""
    if source["kind"] != "digits":  # inverting a photo makes a different photo
        cfg = replace(cfg, invert_prob=0.0)
    data = load_data(source)
    image_size = shape.image_size or (32 if source["kind"] == "digits" else None)  # digits: 8x8 upscaled 4x
    model_cfg = model_cfg or model_config(data, image_size, shape.channels)
    unit_spec = Preprocessing(
        color_mode="L" if model_cfg.in_channels == 1 else "RGB",
        size=(model_cfg.image_size, model_cfg.image_size),
        mean=[0.0] * model_cfg.in_channels,
        std=[1.0] * model_cfg.in_channels,
    )
    views = torch.stack([unit_tensor(data.train, unit_spec, up) for up in UPSCALE_VIEWS.values()])
    mean, std = views[0].mean(dim=(0, 2, 3)), views[0].std(dim=(0, 2, 3))
    spec = unit_spec.model_copy(update={"mean": mean.tolist(), "std": std.tolist()})
    steps_per_epoch = math.ceil(len(data.train.labels) / cfg.batch_size)
    return Training(
        model_cfg, cfg, examples=len(data.train.labels),
        step=batch_step(views, torch.from_numpy(data.train.labels), spec, cfg),
        lr_factor=warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch),
        evaluate=lambda model: held_out_top1(model, data.held_out, unit_spec, spec, cfg),
        fields={"preprocessing": spec.model_dump(), "labels": data.classes, "source": source, "data": data.description},
    )  # fmt: skip


def batch_step(views: torch.Tensor, y: torch.Tensor, spec: Preprocessing, cfg: TrainConfig) -> Step:
    """views `[views, N, C, H, W]`: each image of a batch in a randomly chosen view, augmented, then
    normalised; label-smoothed cross-entropy."""
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]

    def step(model: ViT, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        picked = views[torch.randint(len(views), (len(idx),), generator=gen), idx]
        logits = model((augment(picked, cfg, gen) - mean) / std)
        loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
        return loss, {"loss": loss.item(), "train_acc": float((logits.argmax(-1) == y[idx]).float().mean())}

    return step


def held_out_top1(
    model: ViT, held_out: Split, unit_spec: Preprocessing, spec: Preprocessing, cfg: TrainConfig
) -> dict[str, float]:
    """Top-1 on each view of the held-out images, and on them inverted where training inverted."""
    quality = {}
    for view, upscale in UPSCALE_VIEWS.items():
        units = unit_tensor(held_out, unit_spec, upscale)
        name = "top1" if upscale is None else f"top1_{view}"
        quality[name] = top1(predict(model, _normalize(units, spec)), held_out.labels)
        if cfg.invert_prob > 0:
            quality[f"{name}_inverted"] = top1(predict(model, _normalize(1 - units, spec)), held_out.labels)
    return quality


def _normalize(units: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    return torch.from_numpy(normalize(units.numpy(), spec))


class WithAttention(torch.nn.Module):
    """pixel_values -> (logits, attention `[batch, depth, heads, tokens, tokens]`)."""

    def __init__(self, model: ViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.model(pixel_values, return_attention=True)
        return logits, attention


def write_artifact(model: ViT, checkpoint: dict[str, Any], folder: Path) -> Artifact:
    """The classification and attention graphs in `folder`, parity-checked on the held-out images."""
    spec = Preprocessing.model_validate(checkpoint["preprocessing"])
    held_out = load_data(checkpoint["source"]).held_out
    # the service's exact path: decoded image -> preprocess
    inputs = np.stack([preprocess(img, spec) for img in held_out.images])
    image_shape: list[int | str] = ["batch", spec.channels, *spec.size]
    image = TensorSpec(name="pixel_values", dtype="float32", shape=image_shape)
    logits = TensorSpec(name="logits", dtype="float32", shape=["batch", len(checkpoint["labels"])])
    tokens = model.config.grid**2 + 1
    attention = TensorSpec(
        name="attention", dtype="float32", shape=["batch", model.config.depth, model.config.heads, tokens, tokens]
    )
    graphs = {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=[logits]),
        # served only on request, so classification never computes or copies attention
        "attention": GraphSpec(file="attention.onnx", inputs=[image], outputs=[logits, attention]),
    }
    with_attention = WithAttention(model)
    (onnx_logits,) = export_image_graph(model, inputs, folder, graphs["main"])
    onnx_attention = export_image_graph(with_attention, inputs, folder, graphs["attention"])
    single, double = torch_outputs(with_attention, inputs), torch_outputs(with_attention, inputs, double=True)
    compared = [Compared("main.logits", onnx_logits, single[0], double[0])] + [
        Compared(f"attention.{n}", *arrays)
        for n, *arrays in zip(("logits", "attention"), onnx_attention, single, double, strict=True)
    ]
    parity = check_parity(compared, PARITY_BATCH)
    require_parity(parity)
    return Artifact(graphs, spec, parity, quality={"top1_onnx": top1(onnx_logits, held_out.labels)})


FAMILY = TrainedFamily(
    name="vit", model_class=ViT, model_config=ViTConfig, train_config=TrainConfig,
    data_help="an ImageFolder, DIR/<class>/<image> (default: the digits)",
    task=CLASSIFICATION, architecture="vit", source=source, prepare=prepare, write_artifact=write_artifact,
)  # fmt: skip
train, export = FAMILY.train, FAMILY.export  # the family's own, as this module's functions
