"""Image Transformer: train class-conditionally on the digits (8x8, 17 grey levels: the data set's own
discretisation, so nothing is lost or invented), report held-out bits per dimension next to a
class-conditional per-pixel marginal baseline, export a scoring graph and a cached decoding-step
graph, and check that the cached steps give the full-sequence logits."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

from export.checkpoint import load_checkpoint, save_checkpoint
from export.data import DIGITS_HELD_OUT
from export.onnx_export import (
    BATCH,
    TRACED_BATCH,
    Compared,
    ExportError,
    check_parity,
    manifest_for,
    publish,
    require_free,
    require_parity,
    staging,
    to_onnx,
    torch_outputs,
)
from export.pooled import write_pooled
from models.image_transformer import ImageTransformer, ImageTransformerConfig
from service.manifest import GENERATION, TASK_CHECKS, GenerationConfig, GraphSpec, Manifest, Preprocessing, TensorSpec
from service.outputs import levels_to_image
from service.sampling import POOLED_GRAPH, cache_names, sample

PARITY_BATCH = 5


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    label_dropout: float = 0.1  # trains the unconditional "no label" class too
    seed: int = 0


def source(data: Path | None, seed: int) -> dict[str, Any]:
    if data:
        raise SystemExit("the Image Transformer trains on the digits only")
    return {"kind": "digits", "seed": seed}


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ViT's stratified split, as levels: train pixels `[N, 64]`, labels `[N]`, then held out."""
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.from_numpy(digits.images.reshape(len(digits.images), -1).astype(np.int64))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_HELD_OUT, stratify=labels.numpy(), random_state=seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return pixels[train_idx], labels[train_idx], pixels[test_idx], labels[test_idx]


def bits_per_dim(log_probs: torch.Tensor, pixels: torch.Tensor) -> float:
    """Mean negative log2-likelihood per pixel; log_probs `[N, length, levels]`, pixels `[N, length]`."""
    chosen = log_probs.gather(-1, pixels[..., None])[..., 0]
    return float(-chosen.mean() / math.log(2))


def marginal_baseline(train_x: torch.Tensor, train_y: torch.Tensor, levels: int, classes: int) -> torch.Tensor:
    """Class-conditional per-pixel categorical (add-one smoothing): log-probs `[classes, length, levels]`."""
    counts = torch.ones(classes, train_x.shape[1], levels)
    counts.index_put_(
        (train_y[:, None], torch.arange(train_x.shape[1])[None, :], train_x), torch.ones(()), accumulate=True
    )
    return (counts / counts.sum(-1, keepdim=True)).log()


@torch.no_grad()
def model_log_probs(model: ImageTransformer, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.eval()
    logits = model(pixels, labels)
    assert isinstance(logits, torch.Tensor)
    return logits.log_softmax(-1)


def train(
    source: dict[str, Any],
    out: Path,
    model_cfg: ImageTransformerConfig | None = None,
    cfg: TrainConfig | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    if image_size or channels:
        raise SystemExit("the Image Transformer models the 8x8 grey digits: no --image-size or --channels")
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ImageTransformerConfig()
    train_x, train_y, test_x, test_y = load_split(source["seed"])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ImageTransformer(model_cfg)
    started = time.perf_counter()
    losses = _fit(model, train_x, train_y, cfg, gen)
    seconds = time.perf_counter() - started
    baseline = marginal_baseline(train_x, train_y, model_cfg.levels, model_cfg.num_classes)
    quality = {
        "bits_per_dim": bits_per_dim(model_log_probs(model, test_x, test_y), test_x),
        "baseline_bits_per_dim": bits_per_dim(baseline[test_y], test_x),
        "bits_per_dim_unconditional": bits_per_dim(
            model_log_probs(model, test_x, torch.full_like(test_y, model_cfg.num_classes)), test_x
        ),
    }
    quality["ratio_to_baseline"] = quality["bits_per_dim"] / quality["baseline_bits_per_dim"]
    return save_checkpoint(
        out,
        model,
        model_cfg,
        cfg,
        seconds,
        labels=[str(d) for d in range(model_cfg.num_classes)],
        source=source,
        data={
            "name": "scikit-learn digits, 8x8, 17 grey levels (the data set's own)",
            "train": len(train_y),
            "held_out": len(test_y),
            "split": f"stratified, seed {source['seed']} (the ViT's split)",
        },
        quality=quality,
        losses=losses,
    )


def _fit(
    model: ImageTransformer, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> list[float]:
    """Returns the mean training loss (nats per pixel) of each epoch."""
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    no_label = model.config.num_classes
    progress = tqdm(range(cfg.epochs), desc="image transformer", unit="epoch")
    history = []
    for _ in progress:
        model.train()
        order = torch.randperm(len(x), generator=gen)
        losses = []
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            drop = torch.rand(len(idx), generator=gen) < cfg.label_dropout
            logits = model(x[idx], torch.where(drop, no_label, y[idx]))
            assert isinstance(logits, torch.Tensor)
            loss = F.cross_entropy(logits.flatten(0, 1), x[idx].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        progress.set_postfix(bits_per_dim=f"{np.mean(losses) / math.log(2):.3f}")
        history.append(float(np.mean(losses)))
    return history


class ScoreGraph(torch.nn.Module):
    """pixels `[batch, length]`, labels `[batch]` -> logits `[batch, length, levels]`, log_likelihood `[batch]`."""

    def __init__(self, model: ImageTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixels, labels)
        assert isinstance(logits, torch.Tensor)
        log_likelihood = logits.log_softmax(-1).gather(-1, pixels[..., None])[..., 0].sum(-1)
        return logits, log_likelihood


class AttentionGraph(torch.nn.Module):
    """pixels, labels -> logits and attention `[batch, layers, heads, length, length]` (served on request only)."""

    def __init__(self, model: ImageTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.model(pixels, labels, return_attention=True)
        return logits, attention


class StepGraph(torch.nn.Module):
    """One decoding step with the cache flattened into named inputs and outputs."""

    def __init__(self, model: ImageTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, previous: torch.Tensor, position: torch.Tensor, labels: torch.Tensor, *cache: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        logits, present = self.model.step(previous, position, labels, list(cache))
        return (logits, *present)


def graphs(cfg: GenerationConfig) -> dict[str, GraphSpec]:
    cache_shape: list[int | str] = ["batch", *cfg.cache_shape]
    batch_ints = lambda name: TensorSpec(name=name, dtype="int64", shape=["batch"])  # noqa: E731
    pixels = TensorSpec(name="pixels", dtype="int64", shape=["batch", cfg.length], range=(0, cfg.levels - 1))
    labels = TensorSpec(name="labels", dtype="int64", shape=["batch"], range=(0, cfg.num_classes - 1))
    return {
        "main": GraphSpec(
            file="score.onnx",
            inputs=[pixels, labels],
            outputs=[
                TensorSpec(name="logits", dtype="float32", shape=["batch", cfg.length, cfg.levels]),
                TensorSpec(name="log_likelihood", dtype="float32", shape=["batch"]),
            ],
        ),
        "attention": GraphSpec(
            file="attention.onnx",
            inputs=[pixels, labels],
            outputs=[
                TensorSpec(name="logits", dtype="float32", shape=["batch", cfg.length, cfg.levels]),
                TensorSpec(
                    name="attention", dtype="float32", shape=["batch", cfg.layers, cfg.heads, cfg.length, cfg.length]
                ),
            ],
        ),
        "step": GraphSpec(
            file="step.onnx",
            inputs=[
                batch_ints("previous"),
                batch_ints("position"),
                batch_ints("labels"),
                *(TensorSpec(name=n, dtype="float32", shape=cache_shape) for n in cache_names(cfg, "past_key_values")),
            ],
            outputs=[
                TensorSpec(name="logits", dtype="float32", shape=["batch", cfg.levels]),
                *(TensorSpec(name=n, dtype="float32", shape=cache_shape) for n in cache_names(cfg, "present")),
            ],
        ),
    }


def export_graphs(model: ImageTransformer, cfg: GenerationConfig, folder: Path, specs: dict[str, GraphSpec]) -> None:
    pixels = torch.zeros(TRACED_BATCH, cfg.length, dtype=torch.int64)
    labels = torch.zeros(TRACED_BATCH, dtype=torch.int64)
    for name, module in (("main", ScoreGraph(model)), ("attention", AttentionGraph(model))):
        spec = specs[name]
        to_onnx(
            module, (pixels, labels), folder / spec.file, [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        )
    cache = tuple(model.empty_cache(TRACED_BATCH))
    step = specs["step"]
    dynamic = {
        "previous": {0: BATCH},
        "position": {0: BATCH},
        "labels": {0: BATCH},
        "cache": tuple({0: BATCH} for _ in cache),
    }
    to_onnx(StepGraph(model), (labels.clone(), torch.full_like(labels, 3), labels, *cache), folder / step.file,
            [t.name for t in step.inputs], [t.name for t in step.outputs], dynamic)  # fmt: skip


def cached_logits(
    session: ort.InferenceSession, cfg: GenerationConfig, pixels: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Teacher-forced logits `[batch, length, levels]` from the step graph: one step per position."""
    cache = {
        n: np.zeros((len(labels), *cfg.cache_shape), dtype=np.float32) for n in cache_names(cfg, "past_key_values")
    }
    previous = np.full(len(labels), cfg.levels, dtype=np.int64)
    steps = []
    for t in range(cfg.length):
        position = np.full(len(labels), t, dtype=np.int64)
        logits, *present = session.run(None, {"previous": previous, "position": position, "labels": labels, **cache})
        cache = dict(zip(cache, present, strict=True))
        steps.append(logits)
        previous = pixels[:, t]
    return np.stack(steps, axis=1)


def recognition_rate(
    step: ort.InferenceSession, cfg: GenerationConfig, classifier: Path, per_label: int = 20, seed: int = 0
) -> float | None:
    """Of `per_label` images generated for each label (the service's sampler, fixed seed), the share
    the shipped ViT classifies as that label (through the service's preprocessing). None without a ViT."""
    from service.imaging import preprocess
    from service.repository import load_model
    from service.settings import Settings

    vit = load_model(classifier, Settings(device="cpu", warmup=False), TASK_CHECKS)
    if vit.state != "ready" or vit.manifest is None:
        return None
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), per_label)
    images = sample(step, cfg, labels, seed)
    batch = np.stack([preprocess(levels_to_image(img, cfg.levels), vit.manifest.preprocessing) for img in images])
    (logits,) = vit.sessions["main"].run(None, {vit.manifest.main.inputs[0].name: batch})
    return float((logits.argmax(-1) == labels).mean())


def export(
    checkpoint_path: Path,
    repository: Path,
    name: str = "imagetransformer",
    version: int = 1,
    force: bool = False,
    classifier: Path | None = None,
) -> Manifest:
    """Export both graphs; `classifier` (default: the repository's `vit`) judges the generated digits."""
    classifier = classifier or repository / "vit"
    require_free(repository, name, version, force)  # before the work, not after it
    model, checkpoint = load_checkpoint(checkpoint_path, ImageTransformer, ImageTransformerConfig)
    cfg = GenerationConfig.model_validate(checkpoint["config"])
    *_, test_x, test_y = load_split(checkpoint["source"]["seed"])
    specs = graphs(cfg)
    with staging(name, version) as staged:
        export_graphs(model, cfg, staged, specs)
        score, attention, step = (
            ort.InferenceSession(str(staged / specs[g].file), providers=["CPUExecutionProvider"])
            for g in ("main", "attention", "step")
        )
        feeds = {"pixels": test_x[:PARITY_BATCH].numpy(), "labels": test_y[:PARITY_BATCH].numpy()}
        single = torch_outputs(AttentionGraph(model), *feeds.values())
        double = torch_outputs(AttentionGraph(model), *feeds.values(), double=True)
        onnx_logits, _ = score.run(None, feeds)
        stepped = cached_logits(step, cfg, *feeds.values())
        # the scoring graph against PyTorch, the cached steps against the full sequence, the attention graph
        compared = [
            Compared("main.logits", onnx_logits, single[0], double[0]),
            Compared("step.logits", stepped, single[0], double[0]),
            *(
                Compared(f"attention.{n}", *arrays)
                for n, *arrays in zip(("logits", "attention"), attention.run(None, feeds), single, double, strict=True)
            ),
        ]
        parity = check_parity(compared, PARITY_BATCH)
        require_parity(parity)
        (_, log_likelihood) = score.run(None, {"pixels": test_x.numpy(), "labels": test_y.numpy()})
        onnx_bits = float(-log_likelihood.sum() / (log_likelihood.size * cfg.length * math.log(2)))
        specs[POOLED_GRAPH] = write_pooled(specs["step"], staged)  # checked against the step graph
        rate = recognition_rate(step, cfg, classifier)
        if rate is None:
            raise ExportError(f"no ready ViT at {classifier} to judge the generated digits: export the ViT first")
        preprocessing = Preprocessing(
            color_mode="L", size=(cfg.height, cfg.width), resample="box", mean=[0.0], std=[1.0]
        )
        manifest = manifest_for(
            checkpoint, name=name, version=version, task=GENERATION, architecture="image_transformer",
            graphs=specs, preprocessing=preprocessing, parity=parity,
            quality={"bits_per_dim_onnx": onnx_bits, "vit_recognition_rate": rate},
        )  # fmt: skip
        publish(manifest, staged, repository, force)
    return manifest
