"""`python -m export vit --from DIR --data FOLDER --name NAME [--epochs N] [--seed N]`: fine-tune a
transformers classification checkpoint folder (what `export.hf` imports: ViT, DeiT, BEiT) on your own
ImageFolder, and publish it under its own name.

The checkpoint's head is replaced by a zero-initialised one for FOLDER's labels, as the ViT paper
fine-tunes (Dosovitskiy et al. 2020, section 3.1). The images are prepared by the checkpoint's own
image processor recipe in the service's code (`export.hf.preprocessing_of`), so the model learns from
exactly what it will be served. Training is the shared loop (export/training.py: progress bar,
AdamW, warm-up and cosine decay, early stop); the held-out split is measured once, at the end. The
result is a classifier checkpoint with new labels, published by the importer's own code
(`export.hf.export_checkpoint`: preprocessing and parity gates, attention graph), after a quality
gate of its own: held-out top-1 above always answering the most common label.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export import hf, vit
from export.data import LabelledData, Split, load_image_folder
from export.onnx_export import ExportError
from export.training import Step, Training, fit, warmup_cosine
from service.imaging import Decoded, preprocess_batch
from service.manifest import CLASSIFICATION, Manifest, Preprocessing

# ViT's random warps (export.vit.augment), without its inversion: an inverted photo is another photo
WARPS = replace(vit.TrainConfig(), invert_prob=0.0)


@dataclass
class FinetuneConfig:
    """AdamW at a fine-tuning learning rate, linear warm-up then cosine decay, label smoothing."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    patience: int | None = 5  # epochs without a new low of the training loss before stopping early (None: never)
    augment: bool = True  # WARPS
    seed: int = 0


@dataclass
class Finetuned:
    """A fine-tuned checkpoint, in memory, and what its manifest says of it."""

    checkpoint: hf.Checkpoint
    quality: dict[str, float]
    data: dict[str, Any]
    training: dict[str, Any]


def new_head(ckpt: hf.Checkpoint, classes: list[str]) -> None:
    """Replace the classification head(s) in place by zero-initialised ones for `classes`. In the
    transformers image classifiers we import, the heads are the model's only direct Linear children
    (DeiT with teacher has two, averaged)."""
    model: Any = ckpt.model  # a transformers model: its config is not typed as such
    heads = [name for name, child in model.named_children() if isinstance(child, torch.nn.Linear)]
    if not heads:
        raise ExportError(f"{ckpt.architecture} has no classification head to replace")
    for name in heads:
        head = torch.nn.Linear(getattr(model, name).in_features, len(classes))
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        setattr(model, name, head)
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {label: i for i, label in enumerate(classes)}


def inputs(split: Split, spec: Preprocessing) -> torch.Tensor:
    """Images -> `[N, 3, H, W]`, by the service's own preprocessing."""
    return torch.from_numpy(preprocess_batch([Decoded(img, img.size) for img in split.images], spec))


def batch_step(x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig) -> Step:
    """Label-smoothed cross-entropy on a batch, each image randomly warped (the gap filled with zero:
    the mean colour, in normalised units)."""

    def step(model: Any, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = vit.augment(x[idx], WARPS, gen) if cfg.augment else x[idx]
        logits = model(pixel_values=batch).logits
        loss = F.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
        return loss, {"loss": loss.item(), "train_acc": float((logits.argmax(-1) == y[idx]).float().mean())}

    return step


@torch.no_grad()
def held_out_top1(model: Any, x: torch.Tensor, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    logits = torch.cat([model(pixel_values=x[i : i + batch_size]).logits for i in range(0, len(x), batch_size)])
    return vit.top1(logits.numpy(), labels)


def require_classifier(folder: Path) -> None:
    """Refuse, from config.json alone, a folder that is not a supported classification checkpoint."""
    architecture = hf.architecture_of(folder)
    if hf.SUPPORTED[architecture].task != CLASSIFICATION:
        raise ExportError(f"{architecture} is not a classifier: only classification checkpoints are fine-tuned")


def finetune(folder: Path, data: LabelledData, cfg: FinetuneConfig) -> Finetuned:
    """Load `folder`, give it a head for `data`'s classes and train it on `data`'s training split."""
    require_classifier(folder)
    ckpt = hf.load(folder)
    spec = hf.preprocessing_of(ckpt.processor, CLASSIFICATION)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    new_head(ckpt, data.classes)
    x, y = inputs(data.train, spec), torch.from_numpy(data.train.labels)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    training = Training(
        model_cfg=ckpt.model.config, cfg=cfg, examples=len(y), step=batch_step(x, y, cfg),
        lr_factor=warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch),
        evaluate=lambda model: {"top1": held_out_top1(model, inputs(data.held_out, spec), data.held_out.labels)},
        fields={}, patience=cfg.patience,
    )  # fmt: skip
    started = time.perf_counter()
    losses = fit(ckpt.model, training, gen, desc=f"fine-tune {ckpt.architecture}")
    seconds = time.perf_counter() - started
    ckpt.model.eval()
    ckpt.config = ckpt.model.config.to_dict()  # type: ignore[union-attr,operator]
    # said, not kept: the same command gives the same manifest
    print(f"fine-tuned {len(losses)} epochs in {seconds:.1f} s", file=sys.stderr)
    return Finetuned(
        checkpoint=ckpt,
        quality=training.evaluate(ckpt.model),
        data={"source": data.source, "from": str(folder.resolve()), **data.description},
        training={
            **asdict(cfg),
            "epochs_run": len(losses),
            "threads": torch.get_num_threads(),
            "losses": [round(loss, 4) for loss in losses],
        },
    )


def require_quality(quality: dict[str, float], held_out: Split) -> None:
    """Held-out top-1 must beat always answering the held-out split's most common label."""
    baseline = float(np.bincount(held_out.labels).max() / len(held_out.labels))
    if not quality["top1"] > baseline:
        raise ExportError(
            f"held-out top-1 {quality['top1']:.3f} does not beat always answering the most common label "
            f"({baseline:.3f}); nothing was written"
        )


def run(folder: Path, data_dir: Path, repository: Path, name: str, cfg: FinetuneConfig, version: int = 1,
        force: bool = False) -> Manifest:  # fmt: skip
    """Fine-tune `folder` on the ImageFolder `data_dir` and publish it to `repository/name/version`,
    past the quality, preprocessing and parity gates; nothing is written if any fails."""
    require_classifier(folder)  # before the data is read, not after training
    if not data_dir.is_dir():
        raise ExportError(f"{data_dir} is not a folder of class sub-folders")
    data = load_image_folder(data_dir, seed=cfg.seed)
    tuned = finetune(folder, data, cfg)
    require_quality(tuned.quality, data.held_out)
    return hf.export_checkpoint(tuned.checkpoint, repository, name, version, force, tuned.data, tuned.quality,
                                tuned.training)  # fmt: skip


def main(args: argparse.Namespace) -> Manifest:
    """`python -m export vit --from DIR --data FOLDER --name NAME`: errors exit 2, with nothing written."""
    cfg = FinetuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    try:
        manifest = run(args.start, args.data, args.repository, args.name, cfg, args.version, args.force)
    except (ExportError, ValueError) as exc:  # ValueError: a data folder with fewer than two classes
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    published = f"{args.repository}/{manifest.name}/{manifest.version}"
    print(json.dumps({"published": published, "quality": manifest.quality, "parity": manifest.parity.model_dump()}))
    return manifest
