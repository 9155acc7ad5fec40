"""The training loop every trained family shares: seeding, AdamW under a per-step learning-rate factor,
epochs of shuffled batches behind a progress bar, held-out evaluation and the checkpoint. A family
brings only what is its own, as a `Training`: its data, its batch step and its held-out measure."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from export.checkpoint import save_checkpoint

# (model, a batch's example indices, the run's generator) -> the loss to minimise, figures for the progress bar
Step = Callable[[Any, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


class LoopConfig(Protocol):
    """The fields the loop reads from every family's train config (a dataclass)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


@dataclass(frozen=True)
class Training:
    """One family's training run, ready for the loop; the model itself is built by the loop, after seeding."""

    model_cfg: Any
    cfg: LoopConfig  # the family's train config (a dataclass), as the checkpoint records it
    examples: int  # training examples, taken in a fresh random order every epoch
    step: Step
    lr_factor: Callable[[int], float]  # optimiser step -> multiple of each parameter group's learning rate
    evaluate: Callable[[Any], dict[str, float]]  # the trained model -> its held-out quality
    fields: dict[str, Any]  # what else the checkpoint keeps (preprocessing, labels, source, data)
    parameter_groups: Callable[[Any], Iterable[dict[str, Any]]] | None = None  # AdamW's; default all at cfg.lr
    clip_norm: float | None = None  # the gradients' total norm is clipped to this where set
    patience: int | None = None  # where set, stop once this many epochs in a row bring no new low (see stalled)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps`, then a cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    return factor


def fit(model: nn.Module, training: Training, gen: torch.Generator, desc: str) -> list[float]:
    """Train `model` in place; returns the mean training loss of each epoch."""
    cfg = training.cfg
    groups = training.parameter_groups(model) if training.parameter_groups else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_factor)
    progress = tqdm(range(cfg.epochs), desc=desc, unit="epoch")
    history = []
    for _ in progress:
        model.train()
        order = torch.randperm(training.examples, generator=gen)
        losses, shown = [], []
        for start in range(0, training.examples, cfg.batch_size):
            loss, figures = training.step(model, order[start : start + cfg.batch_size], gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if training.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            shown.append(figures)
        progress.set_postfix({k: f"{np.mean([f[k] for f in shown]):.3f}" for k in shown[0]} if shown else {})
        history.append(float(np.mean(losses)))
        if training.patience and stalled(history, training.patience):
            progress.close()
            break
    return history


def stalled(losses: list[float], patience: int, min_fall: float = 0.01) -> bool:
    """True when none of the last `patience` epochs brought the training loss 1% below its best before
    them. The training loss, not a held-out figure: the held-out split stays unseen until it is measured."""
    if len(losses) <= patience:
        return False
    return min(losses[-patience:]) > min(losses[:-patience]) * (1 - min_fall)


def train_and_save(out: Path, model_class: Callable[[Any], nn.Module], training: Training, desc: str) -> dict[str, Any]:
    """Build the model from a seeded state, train it, measure it and save the checkpoint (weights, both
    configs, training time, the family's fields, quality, losses) to `out`; returns the checkpoint."""
    torch.manual_seed(training.cfg.seed)
    gen = torch.Generator().manual_seed(training.cfg.seed)
    model = model_class(training.model_cfg)
    started = time.perf_counter()
    losses = fit(model, training, gen, desc)
    seconds = time.perf_counter() - started
    quality = training.evaluate(model)
    return save_checkpoint(
        out, model, training.model_cfg, training.cfg, seconds, **training.fields, quality=quality, losses=losses
    )
