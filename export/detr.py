"""DETR: generate digit scenes (or read a COCO data set), train with Hungarian matching, evaluate
COCO mAP with pycocotools, export to ONNX with parity."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.boxes import xyxy_to_cxcywh
from export.coco import CocoData, coco_detections, coco_map, load_coco
from export.criterion import SetCriterion
from export.family import Artifact, InputShape, TrainedFamily
from export.matcher import HungarianMatcher
from export.onnx_export import (
    PARITY_BATCH,
    Compared,
    ExportError,
    check_parity,
    export_image_graph,
    require_parity,
    torch_outputs,
)
from export.scenes import write_scenes
from export.training import Step, Training
from models.detr import DETR, DETRConfig
from service.imaging import letterbox_size, normalize, preprocess, to_unit_array
from service.manifest import DETECTION, GraphSpec, Preprocessing, TensorSpec
from service.outputs import detections

SCENES = Path("runs/scenes")


@dataclass
class TrainConfig:
    """AdamW with the backbone at its own rate, warm-up times cosine decay, clipped gradients, DETR's set loss."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    # the loss's weights (the matcher keeps DETR's costs); class 5, not DETR's 1: from scratch, not pretrained
    class_loss_weight: float = 5.0
    l1_loss_weight: float = 5.0
    giou_loss_weight: float = 2.0
    clip_norm: float = 0.1
    seed: int = 0


def source(data: Path | None, seed: int) -> dict[str, Any]:
    """Generated digit scenes, or a COCO data set laid out as `DIR/{train,held_out}/annotations.json`
    with each split's images in `images/` beside its JSON."""
    if data:
        root = data.resolve()
        return {"kind": "coco", "train": str(root / "train" / "annotations.json"),
                "held_out": str(root / "held_out" / "annotations.json")}  # fmt: skip
    return {"kind": "scenes", "path": str(SCENES), "seed": seed}


def load_data(source: dict[str, Any]) -> tuple[CocoData, CocoData]:
    """`{"kind": "scenes", "path": DIR, "seed": 0}` (generated on first use) or
    `{"kind": "coco", "train": JSON, "held_out": JSON}` (images in `images/` beside each JSON)."""
    if source["kind"] == "coco":
        return load_coco(Path(source["train"])), load_coco(Path(source["held_out"]))
    root = Path(source["path"])
    if not (root / "held_out" / "annotations.json").exists():
        write_scenes(root, seed=source["seed"])
    return load_coco(root / "train" / "annotations.json"), load_coco(root / "held_out" / "annotations.json")


def targets_for(data: CocoData, spec: Preprocessing) -> list[dict[str, torch.Tensor]]:
    """Pixel boxes -> (cx, cy, w, h) relative to the letterboxed input, per image."""
    height, width = spec.size
    targets = []
    for image, boxes, labels in zip(data.images, data.boxes, data.labels, strict=True):
        inner_w, inner_h = letterbox_size(image.width, image.height, spec)
        scale = np.array([inner_w / image.width / width, inner_h / image.height / height] * 2, dtype=np.float32)
        xyxy = torch.from_numpy(boxes * scale)
        targets.append({"labels": torch.from_numpy(labels), "boxes": xyxy_to_cxcywh(xyxy).float()})
    return targets


def inputs_for(data: CocoData, spec: Preprocessing) -> np.ndarray:
    """The service's exact preprocessing of every image: `[N, C, S, S]`."""
    return np.stack([preprocess(image, spec) for image in data.images])


@torch.no_grad()
def forward_all(model: DETR, inputs: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    logits, boxes = [], []
    for i in range(0, len(inputs), batch_size):
        out = model(torch.from_numpy(inputs[i : i + batch_size]))
        logits.append(out["logits"].numpy())
        boxes.append(out["boxes"].numpy())
    return np.concatenate(logits), np.concatenate(boxes)


def evaluate(data: CocoData, logits: np.ndarray, boxes: np.ndarray, spec: Preprocessing) -> dict[str, float]:
    """COCO mAP of the service's own post-processing (every query, no threshold) on `data`."""
    found = []
    for i, image in enumerate(data.images):
        kept = detections(logits[i], boxes[i], image.size, spec, threshold=0.0, limit=1000)
        found += coco_detections(data, i, kept.boxes, kept.scores, kept.labels)
    return coco_map(data.annotations, found)


def model_config(data: CocoData, image_size: int | None = None, channels: int | None = None) -> DETRConfig:
    """96x96 unless `image_size` says otherwise; RGB if any image is in colour, unless `channels` says."""
    cfg = DETRConfig(num_classes=len(data.classes))
    cfg.image_size = image_size or cfg.image_size
    if cfg.image_size % cfg.stride:
        raise ValueError(f"--image-size {cfg.image_size}: a multiple of the backbone's stride {cfg.stride}")
    cfg.in_channels = channels or (3 if any(image.mode == "RGB" for image in data.images) else 1)
    return cfg


def prepare(source: dict[str, Any], model_cfg: DETRConfig | None, cfg: TrainConfig, shape: InputShape) -> Training:
    """Letterboxed images normalised by their own mean and std, boxes relative to the input; held-out COCO mAP."""
    train_data, held_out = load_data(source)
    model_cfg = model_cfg or model_config(train_data, shape.image_size, shape.channels)
    size = (model_cfg.image_size, model_cfg.image_size)
    mode = "RGB" if model_cfg.in_channels == 3 else "L"
    zeros, ones = [0.0] * model_cfg.in_channels, [1.0] * model_cfg.in_channels
    unit_spec = Preprocessing(color_mode=mode, size=size, resize="letterbox", fill=0, mean=zeros, std=ones)
    units = np.stack([to_unit_array(image, unit_spec) for image in train_data.images])
    stats = {"mean": units.mean(axis=(0, 2, 3)).tolist(), "std": units.std(axis=(0, 2, 3)).tolist()}
    spec = unit_spec.model_copy(update=stats)
    return Training(
        model_cfg, cfg, examples=len(units),
        step=batch_step(torch.from_numpy(normalize(units, spec)), targets_for(train_data, spec), model_cfg, cfg),
        lr_factor=warmup_times_cosine(cfg.epochs * math.ceil(len(units) / cfg.batch_size), cfg.warmup_steps),
        evaluate=lambda model: evaluate(held_out, *forward_all(model, inputs_for(held_out, spec)), spec),
        fields={"preprocessing": spec.model_dump(), "labels": train_data.classes, "source": source,
                "data": data_description(source, train_data, held_out)},
        parameter_groups=lambda model: parameter_groups(model, cfg.backbone_lr),
        clip_norm=cfg.clip_norm,
    )  # fmt: skip


def data_description(source: dict[str, Any], train_data: CocoData, held_out: CocoData) -> dict[str, Any]:
    """What the checkpoint and the manifest say of the data."""
    return {
        "name": "digit scenes (export.scenes), COCO format" if source["kind"] == "scenes" else "COCO data set",
        "train_images": len(train_data.images),
        "held_out_images": len(held_out.images),
        "held_out_boxes": int(sum(len(b) for b in held_out.boxes)),
    }


def warmup_times_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """A linear warm-up over `warmup_steps` multiplying a cosine decay over the whole run."""
    return lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0)))


def parameter_groups(model: DETR, backbone_lr: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the transformer and heads at the base rate, the backbone at its own."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [{"params": rest}, {"params": backbone, "lr": backbone_lr}]


def batch_step(
    x: torch.Tensor, targets: list[dict[str, torch.Tensor]], model_cfg: DETRConfig, cfg: TrainConfig
) -> Step:
    """DETR's set loss over the final and auxiliary decoder layers (Hungarian-matched with DETR's costs);
    the progress bar shows the final layer's terms."""
    criterion = SetCriterion(
        model_cfg.num_classes,
        HungarianMatcher(class_weight=1.0, l1_weight=5.0, giou_weight=2.0),
        class_weight=cfg.class_loss_weight,
        l1_weight=cfg.l1_loss_weight,
        giou_weight=cfg.giou_loss_weight,
    )

    def step(model: DETR, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return criterion(model(x[idx], return_aux=True), [targets[j] for j in idx])  # type: ignore[no-any-return]

    return step


class DETRForOnnx(torch.nn.Module):
    """The served graphs: pixel_values -> (logits, boxes), and with `attention` also the encoder
    self-attention and the decoder cross-attention. No auxiliary heads."""

    def __init__(self, model: DETR, attention: bool = False) -> None:
        super().__init__()
        self.model = model
        self.attention = attention

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values, return_attention=self.attention)
        names = ["logits", "boxes", *(["encoder_attention", "decoder_attention"] if self.attention else [])]
        return tuple(out[n] for n in names)  # type: ignore[misc]


def detr_graphs(cfg: DETRConfig, spec: Preprocessing) -> dict[str, GraphSpec]:
    image = TensorSpec(name="pixel_values", dtype="float32", shape=["batch", spec.channels, *spec.size])
    outputs = [
        TensorSpec(name="logits", dtype="float32", shape=["batch", cfg.num_queries, cfg.num_classes + 1]),
        TensorSpec(name="boxes", dtype="float32", shape=["batch", cfg.num_queries, 4]),
    ]
    cells, queries = cfg.grid**2, cfg.num_queries
    attention = [
        TensorSpec(
            name="encoder_attention", dtype="float32", shape=["batch", cfg.encoder_layers, cfg.heads, cells, cells]
        ),
        TensorSpec(
            name="decoder_attention", dtype="float32", shape=["batch", cfg.decoder_layers, cfg.heads, queries, cells]
        ),
    ]
    return {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=outputs),
        # served only on request, so detection never computes or copies attention
        "attention": GraphSpec(file="attention.onnx", inputs=[image], outputs=outputs + attention),
    }


def write_artifact(model: DETR, checkpoint: dict[str, Any], folder: Path) -> Artifact:
    """The detection and attention graphs in `folder`, parity-checked on the held-out scenes, with the
    same detections as PyTorch's at the served threshold."""
    spec = Preprocessing.model_validate(checkpoint["preprocessing"])
    _, held_out = load_data(checkpoint["source"])
    inputs = inputs_for(held_out, spec)
    graphs = detr_graphs(model.config, spec)
    onnx_logits, onnx_boxes = export_image_graph(DETRForOnnx(model), inputs, folder, graphs["main"])
    # the attention graph, checked on a subset: its maps are large
    subset = inputs[: 2 * PARITY_BATCH]
    onnx_attention = export_image_graph(DETRForOnnx(model, attention=True), subset, folder, graphs["attention"])
    compared = compare_outputs(model, inputs, [onnx_logits, onnx_boxes], graphs["main"])
    compared += compare_outputs(model, subset, onnx_attention, graphs["attention"], attention=True)
    parity = check_parity(compared, PARITY_BATCH)
    require_parity(parity)
    ref_logits, ref_boxes = compared[0].float32, compared[1].float32
    require_same_detections(held_out, (ref_logits, ref_boxes), (onnx_logits, onnx_boxes), spec)
    onnx_quality = evaluate(held_out, onnx_logits, onnx_boxes, spec)
    return Artifact(graphs, spec, parity, quality={f"{k}_onnx": v for k, v in onnx_quality.items()})


def compare_outputs(
    model: DETR, inputs: np.ndarray, onnx: list[np.ndarray], spec: GraphSpec, attention: bool = False
) -> list[Compared]:
    """ONNX Runtime's outputs of one graph beside PyTorch's in float32 and float64."""
    module = DETRForOnnx(model, attention=attention)
    single, double = torch_outputs(module, inputs), torch_outputs(module, inputs, double=True)
    graph = "attention" if attention else "main"
    return [
        Compared(f"{graph}.{t.name}", *arrays) for t, *arrays in zip(spec.outputs, onnx, single, double, strict=True)
    ]


def require_same_detections(
    data: CocoData,
    reference: tuple[np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray],
    spec: Preprocessing,
) -> None:
    """At the served threshold, PyTorch and ONNX Runtime must find the same boxes (IoU >= 0.99, same labels)."""
    for i, image in enumerate(data.images):
        a = detections(reference[0][i], reference[1][i], image.size, spec, 0.5, 100)
        b = detections(candidate[0][i], candidate[1][i], image.size, spec, 0.5, 100)
        if (
            len(a.boxes) != len(b.boxes)
            or not (a.labels == b.labels).all()
            or (len(a.boxes) and min_iou(a.boxes, b.boxes) < 0.99)
        ):
            raise ExportError(f"held-out image {i}: ONNX detections differ from PyTorch's; nothing was written")


def min_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest IoU of row-matched xyxy boxes."""
    top_left, bottom_right = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return float((inter / (area(a) + area(b) - inter)).min())


FAMILY = TrainedFamily(
    name="detr", model_class=DETR, model_config=DETRConfig, train_config=TrainConfig,
    data_help="COCO, DIR/{train,held_out}/annotations.json with images/ beside each (default: digit scenes)",
    task=DETECTION, architecture="detr", source=source, prepare=prepare, write_artifact=write_artifact,
)  # fmt: skip
train, export = FAMILY.train, FAMILY.export  # the family's own, as this module's functions
