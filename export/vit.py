"""ViT: train on digits (or an ImageFolder), evaluate held-out top-1, export to ONNX with parity."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from export.checkpoint import load_checkpoint, save_checkpoint
from export.data import LabelledData, Split, load_digits_data, load_image_folder
from export.onnx_export import (
    PARITY_BATCH,
    Compared,
    check_parity,
    export_image_graph,
    manifest_for,
    publish,
    require_free,
    require_parity,
    staging,
    torch_outputs,
)
from models.vit import ViT, ViTConfig
from service.imaging import normalize, preprocess, to_unit_array
from service.manifest import CLASSIFICATION, GraphSpec, Manifest, Preprocessing, TensorSpec


@dataclass
class TrainConfig:
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


def train(
    source: dict[str, Any],
    out: Path,
    model_cfg: ViTConfig | None = None,
    cfg: TrainConfig | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate held-out top-1 and save `{"model", "config", ...}` to `out`; returns the checkpoint."""
    cfg = cfg or TrainConfig()
    if source["kind"] != "digits":  # inverting a photo makes a different photo
        cfg = replace(cfg, invert_prob=0.0)
    data = load_data(source)
    if source["kind"] == "digits":  # the shipped model's input: 8x8 digits upscaled 4x
        image_size = image_size or 32
    model_cfg = model_cfg or model_config(data, image_size, channels)
    unit_spec = Preprocessing(
        color_mode="L" if model_cfg.in_channels == 1 else "RGB",
        size=(model_cfg.image_size, model_cfg.image_size),
        mean=[0.0] * model_cfg.in_channels,
        std=[1.0] * model_cfg.in_channels,
    )
    train_views = torch.stack([unit_tensor(data.train, unit_spec, up) for up in UPSCALE_VIEWS.values()])
    mean, std = train_views[0].mean(dim=(0, 2, 3)), train_views[0].std(dim=(0, 2, 3))
    spec = unit_spec.model_copy(update={"mean": mean.tolist(), "std": std.tolist()})
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ViT(model_cfg)
    started = time.perf_counter()
    losses = _fit(model, train_views, torch.from_numpy(data.train.labels), spec, cfg, gen)
    seconds = time.perf_counter() - started

    quality = {}
    for view, upscale in UPSCALE_VIEWS.items():
        units = unit_tensor(data.held_out, unit_spec, upscale)
        name = "top1" if upscale is None else f"top1_{view}"
        quality[name] = top1(predict(model, _normalize(units, spec)), data.held_out.labels)
        if cfg.invert_prob > 0:
            quality[f"{name}_inverted"] = top1(predict(model, _normalize(1 - units, spec)), data.held_out.labels)
    return save_checkpoint(
        out,
        model,
        model_cfg,
        cfg,
        seconds,
        preprocessing=spec.model_dump(),
        labels=data.classes,
        source=source,
        data=data.description,
        quality=quality,
        losses=losses,
    )


def _normalize(units: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    return torch.from_numpy(normalize(units.numpy(), spec))


def _fit(
    model: ViT, views: torch.Tensor, y: torch.Tensor, spec: Preprocessing, cfg: TrainConfig, gen: torch.Generator
) -> list[float]:
    """views `[views, N, C, H, W]`: each step takes every image in a randomly chosen view. Returns the
    mean training loss of each epoch."""
    n = views.shape[1]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    progress = tqdm(range(cfg.epochs), desc="vit", unit="epoch")
    history = []
    for _ in progress:
        model.train()
        order = torch.randperm(n, generator=gen)
        losses, correct = [], 0
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            picked = views[torch.randint(len(views), (len(idx),), generator=gen), idx]
            logits = model((augment(picked, cfg, gen) - mean) / std)
            loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            correct += int((logits.argmax(-1) == y[idx]).sum())
        progress.set_postfix(loss=f"{np.mean(losses):.3f}", train_acc=f"{correct / n:.3f}")
        history.append(float(np.mean(losses)))
    return history


class WithAttention(torch.nn.Module):
    """pixel_values -> (logits, attention `[batch, depth, heads, tokens, tokens]`)."""

    def __init__(self, model: ViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.model(pixel_values, return_attention=True)
        return logits, attention


def export(
    checkpoint_path: Path, repository: Path, name: str = "vit", version: int = 1, force: bool = False
) -> Manifest:
    """Export a checkpoint to `repository/name/version/`, only if it passes parity on held-out images."""
    require_free(repository, name, version, force)  # before the work, not after it
    model, checkpoint = load_checkpoint(checkpoint_path, ViT, ViTConfig)
    spec = Preprocessing.model_validate(checkpoint["preprocessing"])
    held_out = load_data(checkpoint["source"]).held_out
    # the service's exact path: decoded image -> preprocess
    inputs = np.stack([preprocess(img, spec) for img in held_out.images])
    image_shape: list[int | str] = ["batch", spec.channels, *spec.size]
    image = TensorSpec(name="pixel_values", dtype="float32", shape=image_shape)
    logits = TensorSpec(name="logits", dtype="float32", shape=["batch", len(checkpoint["labels"])])
    tokens = model.config.grid**2 + 1
    graphs = {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=[logits]),
        # served only on request, so classification never computes or copies attention
        "attention": GraphSpec(
            file="attention.onnx",
            inputs=[image],
            outputs=[
                logits,
                TensorSpec(
                    name="attention",
                    dtype="float32",
                    shape=["batch", model.config.depth, model.config.heads, tokens, tokens],
                ),
            ],
        ),  # fmt: skip
    }
    with_attention = WithAttention(model)
    with staging(name, version) as staged:
        (onnx_logits,) = export_image_graph(model, inputs, staged, graphs["main"])
        onnx_attention = export_image_graph(with_attention, inputs, staged, graphs["attention"])
        single, double = torch_outputs(with_attention, inputs), torch_outputs(with_attention, inputs, double=True)
        compared = [Compared("main.logits", onnx_logits, single[0], double[0])] + [
            Compared(f"attention.{n}", *arrays)
            for n, *arrays in zip(("logits", "attention"), onnx_attention, single, double, strict=True)
        ]
        parity = check_parity(compared, PARITY_BATCH)
        require_parity(parity)
        manifest = manifest_for(
            checkpoint, name=name, version=version, task=CLASSIFICATION, architecture="vit", graphs=graphs,
            preprocessing=spec, quality={"top1_onnx": top1(onnx_logits, held_out.labels)}, parity=parity,
        )  # fmt: skip
        publish(manifest, staged, repository, force)
    return manifest
