"""Image Transformer: train class-conditionally on the digits (8x8, 17 grey levels: the data set's own
discretisation, so nothing is lost or invented), report held-out bits per dimension next to a
class-conditional per-pixel marginal baseline, export a scoring graph and a cached decoding-step
graph, and check that the cached steps give the full-sequence logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from export.data import DIGITS_HELD_OUT
from export.family import Artifact, InputShape, TrainedFamily
from export.onnx_export import (
    BATCH,
    TRACED_BATCH,
    Compared,
    ExportError,
    check_parity,
    require_parity,
    to_onnx,
    torch_outputs,
)
from export.pooled import write_pooled
from export.training import Step, Training, warmup_cosine
from models.image_transformer import ImageTransformer, ImageTransformerConfig
from service.manifest import GENERATION, TASK_CHECKS, GenerationConfig, GraphSpec, Parity, Preprocessing, TensorSpec
from service.outputs import levels_to_image
from service.sampling import POOLED_GRAPH, cache_names, sample

PARITY_BATCH = 5


@dataclass
class TrainConfig:
    """AdamW, linear warm-up then cosine decay, labels dropped now and then (class-conditional and not)."""

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


def prepare(
    source: dict[str, Any], model_cfg: ImageTransformerConfig | None, cfg: TrainConfig, shape: InputShape
) -> Training:
    """The digits' own 17 levels on the ViT's split; held-out bits per dimension beside a marginal baseline."""
    if shape.image_size or shape.channels:
        raise SystemExit("the Image Transformer models the 8x8 grey digits: no --image-size or --channels")
    model_cfg = model_cfg or ImageTransformerConfig()
    train_x, train_y, test_x, test_y = load_split(source["seed"])
    data = {
        "name": "scikit-learn digits, 8x8, 17 grey levels (the data set's own)",
        "train": len(train_y),
        "held_out": len(test_y),
        "split": f"stratified, seed {source['seed']} (the ViT's split)",
    }
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    return Training(
        model_cfg, cfg, examples=len(train_x),
        step=batch_step(train_x, train_y, model_cfg.num_classes, cfg.label_dropout),
        lr_factor=warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch),
        evaluate=lambda model: held_out_bits(model, train_x, train_y, test_x, test_y),
        fields={"labels": [str(d) for d in range(model_cfg.num_classes)], "source": source, "data": data},
    )  # fmt: skip


def batch_step(x: torch.Tensor, y: torch.Tensor, no_label: int, label_dropout: float) -> Step:
    """Next-pixel cross-entropy (nats per pixel); each label is dropped to `no_label` with `label_dropout`,
    so the model also learns the unconditional distribution."""

    def step(model: ImageTransformer, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        drop = torch.rand(len(idx), generator=gen) < label_dropout
        logits = model(x[idx], torch.where(drop, no_label, y[idx]))
        assert isinstance(logits, torch.Tensor)
        loss = F.cross_entropy(logits.flatten(0, 1), x[idx].flatten())
        return loss, {"bits_per_dim": loss.item() / math.log(2)}

    return step


def held_out_bits(
    model: ImageTransformer, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> dict[str, float]:
    """Held-out bits per dimension, labelled and unlabelled, beside the per-pixel marginal baseline."""
    cfg = model.config
    baseline = marginal_baseline(train_x, train_y, cfg.levels, cfg.num_classes)
    quality = {
        "bits_per_dim": bits_per_dim(model_log_probs(model, test_x, test_y), test_x),
        "baseline_bits_per_dim": bits_per_dim(baseline[test_y], test_x),
        "bits_per_dim_unconditional": bits_per_dim(
            model_log_probs(model, test_x, torch.full_like(test_y, cfg.num_classes)), test_x
        ),
    }
    quality["ratio_to_baseline"] = quality["bits_per_dim"] / quality["baseline_bits_per_dim"]
    return quality


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


def write_artifact(model: ImageTransformer, checkpoint: dict[str, Any], folder: Path, classifier: Path) -> Artifact:
    """The scoring, attention, decoding-step and pooled-step graphs in `folder`, parity-checked; the
    generated digits judged by the ViT published at `classifier`."""
    cfg = GenerationConfig.model_validate(checkpoint["config"])
    *_, test_x, test_y = load_split(checkpoint["source"]["seed"])
    specs = graphs(cfg)
    export_graphs(model, cfg, folder, specs)
    score, attention, step = (
        ort.InferenceSession(str(folder / specs[g].file), providers=["CPUExecutionProvider"])
        for g in ("main", "attention", "step")
    )
    feeds = {"pixels": test_x[:PARITY_BATCH].numpy(), "labels": test_y[:PARITY_BATCH].numpy()}
    parity = require_graph_parity(model, cfg, (score, attention, step), feeds)
    (_, log_likelihood) = score.run(None, {"pixels": test_x.numpy(), "labels": test_y.numpy()})
    onnx_bits = float(-log_likelihood.sum() / (log_likelihood.size * cfg.length * math.log(2)))
    specs[POOLED_GRAPH] = write_pooled(specs["step"], folder)  # checked against the step graph
    rate = recognition_rate(step, cfg, classifier)
    if rate is None:
        raise ExportError(f"no ready ViT at {classifier} to judge the generated digits: export the ViT first")
    preprocessing = Preprocessing(color_mode="L", size=(cfg.height, cfg.width), resample="box", mean=[0.0], std=[1.0])
    return Artifact(
        specs, preprocessing, parity, quality={"bits_per_dim_onnx": onnx_bits, "vit_recognition_rate": rate}
    )


def require_graph_parity(
    model: ImageTransformer, cfg: GenerationConfig, sessions: tuple[ort.InferenceSession, ...], feeds: dict[str, Any]
) -> Parity:
    """The scoring graph against PyTorch, the cached steps against the full sequence, the attention graph;
    ExportError where any output is out of its tolerance."""
    score, attention, step = sessions
    single = torch_outputs(AttentionGraph(model), *feeds.values())
    double = torch_outputs(AttentionGraph(model), *feeds.values(), double=True)
    onnx_logits, _ = score.run(None, feeds)
    stepped = cached_logits(step, cfg, *feeds.values())
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
    return parity


def export_options(repository: Path) -> dict[str, Any]:
    """The ViT published in the same repository judges the generated digits (also through --fp16's scratch folder)."""
    return {"classifier": repository / "vit"}


FAMILY = TrainedFamily(
    name="imagetransformer", model_class=ImageTransformer, model_config=ImageTransformerConfig,
    train_config=TrainConfig, data_help="not taken (the digits only)",
    task=GENERATION, architecture="image_transformer", source=source, prepare=prepare,
    write_artifact=write_artifact, export_options=export_options,
)  # fmt: skip
train, export = FAMILY.train, FAMILY.export  # the family's own, as this module's functions
