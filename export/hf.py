"""`python -m export.hf DIR --name NAME [--version N] [--repository REPO] [--force]`: import a Hugging Face
checkpoint folder (`config.json`, `model.safetensors`, `preprocessor_config.json`) into the model repository.

Reads the local folder only, never the network. Exports the model and its attention graph to ONNX (a
dynamic batch axis; a detector also takes any height and width), writes the manifest with the image
processor's recipe, and publishes only if ONNX Runtime agrees with transformers on real photos: the
service's preprocessing against the image processor's, and the graphs' outputs against PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from export.onnx_export import (
    BATCH,
    OPSET,
    PARITY_BATCH,
    Compared,
    ExportError,
    check_parity,
    export_image_graph,
    library_versions,
    publish,
    require_parity,
    staging,
    to_onnx,
    torch_outputs,
)
from service.imaging import Decoded, preprocess_batch
from service.manifest import CLASSIFICATION, DETECTION, GENERATION, GraphSpec, Manifest, Preprocessing, TensorSpec
from service.settings import PROJECT_ROOT

# PIL's filter numbers, as image processors store them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}
PREPROCESSING_TOLERANCE = 1e-5  # the service's input tensor against the image processor's


@dataclass(frozen=True)
class Family:
    """What the importer knows of one transformers architecture."""

    task: str
    prefix_tokens: int = 1  # classification: tokens before the patches


SUPPORTED: dict[str, Family] = {
    "ViTForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),
    "DeiTForImageClassification": Family(CLASSIFICATION, prefix_tokens=2),  # CLS and distillation tokens
    # transformers averages its two heads (CLS and distillation) into `logits`; so does the graph
    "DeiTForImageClassificationWithTeacher": Family(CLASSIFICATION, prefix_tokens=2),
    "DetrForObjectDetection": Family(DETECTION),
    "BeitForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),  # relative position bias: exports too
    "ImageGPTForCausalImageModeling": Family(GENERATION),  # imported by export/hf_imagegpt.py
}


def supported() -> str:
    return ", ".join(SUPPORTED)


# reading the folder -------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    folder: Path
    architecture: str
    family: Family
    model: torch.nn.Module
    processor: Any  # a transformers image processor (the PIL backend)
    config: dict[str, Any]


def architecture_of(folder: Path) -> str:
    """The checkpoint's architecture from its config.json, refused unless supported. Reads no weights."""
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    for needed in ("config.json", "preprocessor_config.json"):
        if not (folder / needed).is_file():
            raise ExportError(f"{folder} has no {needed}: not a Hugging Face checkpoint folder")
    try:
        config = json.loads((folder / "config.json").read_text())
        architectures = config["architectures"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{folder / 'config.json'} is not a transformers config (no 'architectures'): {exc}") from exc
    known = [a for a in architectures if a in SUPPORTED]
    if not known:
        raise ExportError(f"unsupported architecture {', '.join(map(str, architectures))}; supported: {supported()}")
    return str(known[0])


def load(folder: Path) -> Checkpoint:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    architecture = architecture_of(folder)
    try:
        model_class = getattr(transformers, architecture)
        model = model_class.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a truncated safetensors file, a broken JSON, missing weights...
        raise ExportError(f"{folder} could not be loaded by transformers: {type(exc).__name__}: {exc}") from exc
    if getattr(processor, "backend", "pil") != "pil":
        raise ExportError(f"the image processor {type(processor).__name__} is not the PIL one the service replicates")
    problem = model.config.problem_type
    if problem not in (None, "single_label_classification") or model.config.num_labels < 2:
        raise ExportError(f"only softmax classifiers are imported (problem_type {problem!r})")
    return Checkpoint(folder, architecture, SUPPORTED[architecture], model, processor, model.config.to_dict())


def preprocessing_of(processor: Any, task: str) -> Preprocessing:
    """The image processor's recipe in the manifest's words."""
    p = processor
    size, resample = dict(p.size or {}), RESAMPLE.get(int(p.resample))
    if not p.do_resize or resample is None:
        raise ExportError(f"unsupported image processor settings: do_resize={p.do_resize}, resample={p.resample}")
    if getattr(p, "do_pad", False) and getattr(p, "pad_size", None):
        raise ExportError(f"padding to a fixed pad_size ({p.pad_size}) is not supported: images run unpadded")
    recipe: dict[str, Any] = {"color_mode": "RGB", "resample": resample, "reduced_decode": False}
    if size.get("height") and size.get("width"):
        recipe |= {"resize": "stretch", "size": (size["height"], size["width"])}
    elif size.get("shortest_edge"):
        short, long = size["shortest_edge"], size.get("longest_edge")
        recipe |= {
            "resize": "shortest_edge",
            "shortest_edge": short,
            "longest_edge": long,
            "size": (short, long or short),
        }
    else:
        raise ExportError(f"unsupported image processor size {size}")
    if getattr(p, "do_center_crop", False):
        crop = (p.crop_size["height"], p.crop_size["width"])
        if recipe["resize"] == "stretch":
            recipe["stretch_to"] = recipe["size"]
        recipe |= {"crop": crop, "size": crop}
    elif task == CLASSIFICATION and recipe["resize"] == "shortest_edge":
        raise ExportError("a classifier resized by its shortest edge needs a centre crop (a fixed input size)")
    recipe["rescale_factor"] = float(p.rescale_factor) if p.do_rescale else 1.0
    mean, std = (p.image_mean, p.image_std) if p.do_normalize else ([0.0] * 3, [1.0] * 3)
    recipe |= {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    return Preprocessing.model_validate(recipe)


# the graphs ---------------------------------------------------------------------------------------


class Classifier(torch.nn.Module):
    """pixel_values -> logits, and with `attention` the attention `[batch, layers, heads, tokens, tokens]`."""

    def __init__(self, model: torch.nn.Module, attention: bool = False) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, pixel_values: torch.Tensor) -> Any:
        out = self.model(pixel_values=pixel_values, output_attentions=self.attention)
        return (out.logits, torch.stack(out.attentions, 1)) if self.attention else out.logits


class Detector(torch.nn.Module):
    """pixel_values (pixel_mask all ones: one unpadded image) -> logits, boxes (cx, cy, w, h relative to
    the image), and with `attention` the encoder self-attention and the decoder cross-attention."""

    def __init__(self, model: torch.nn.Module, attention: bool = False) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, output_attentions=self.attention)
        if not self.attention:
            return out.logits, out.pred_boxes
        return out.logits, out.pred_boxes, torch.stack(out.encoder_attentions, 1), torch.stack(out.cross_attentions, 1)


def f32(name: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=list(shape))


def classifier_graphs(cfg: Any, spec: Preprocessing, labels: int, prefix: int) -> dict[str, GraphSpec]:
    image = f32("pixel_values", "batch", 3, *spec.size)
    tokens = (spec.size[0] // cfg.patch_size) * (spec.size[1] // cfg.patch_size) + prefix
    logits = f32("logits", "batch", labels)
    attention = f32("attention", "batch", cfg.num_hidden_layers, cfg.num_attention_heads, tokens, tokens)
    return {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=[logits]),
        "attention": GraphSpec(file="attention.onnx", inputs=[image], outputs=[logits, attention]),
    }


def detector_graphs(cfg: Any, labels: int) -> dict[str, GraphSpec]:
    image = f32("pixel_values", "batch", 3, "height", "width")
    queries, heads = cfg.num_queries, cfg.encoder_attention_heads
    outputs = [f32("logits", "batch", queries, labels + 1), f32("boxes", "batch", queries, 4)]
    attention = [
        f32("encoder_attention", "batch", cfg.encoder_layers, heads, "cells", "cells"),
        f32("decoder_attention", "batch", cfg.decoder_layers, cfg.decoder_attention_heads, queries, "cells"),
    ]
    return {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=outputs),
        "attention": GraphSpec(file="attention.onnx", inputs=[image], outputs=outputs + attention),
    }


# photos and parity --------------------------------------------------------------------------------


def sample_photos() -> list[Image.Image]:
    """Real photos: scikit-learn's two, and crops of them at other sizes and aspects (portrait included)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    crops = [photos[0].crop((40, 10, 360, 410)), photos[1].crop((100, 50, 611, 300)), photos[1].resize((150, 97))]
    return photos + crops


def preprocessing_error(processor: Any, spec: Preprocessing, photos: list[Image.Image]) -> float:
    """Max abs difference between the service's input tensors and the image processor's, per photo."""
    worst = 0.0
    for photo in photos:
        ours = preprocess_batch([Decoded(photo, photo.size)], spec)
        theirs = np.asarray(processor(images=photo, return_tensors="np")["pixel_values"], dtype=np.float64)
        if ours.shape != theirs.shape:
            raise ExportError(f"preprocessing differs from the image processor's: shape {ours.shape} vs {theirs.shape}")
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def classifier_parity(ckpt: Checkpoint, spec: Preprocessing, staged: Path, graphs: dict[str, GraphSpec]) -> Any:
    """Every output of both graphs against PyTorch in float32 and float64, on photos and their flips."""
    photos = sample_photos()
    inputs = preprocess_batch([Decoded(p, p.size) for p in photos], spec)
    inputs = np.concatenate([inputs, inputs[:, :, ::-1].copy(), inputs[:, :, :, ::-1].copy()])  # flips: more cases
    (onnx_logits,) = export_image_graph(Classifier(ckpt.model), inputs, staged, graphs["main"])
    onnx_attention = export_image_graph(Classifier(ckpt.model, attention=True), inputs, staged, graphs["attention"])
    reference = Classifier(ckpt.model, attention=True)
    single, double = torch_outputs(reference, inputs), torch_outputs(reference, inputs, double=True)
    names = [f"attention.{t.name}" for t in graphs["attention"].outputs]
    compared = [Compared("main.logits", onnx_logits, single[0], double[0])] + [
        Compared(name, *arrays) for name, *arrays in zip(names, onnx_attention, single, double, strict=True)
    ]
    return check_parity(compared, PARITY_BATCH)


def detector_parity(ckpt: Checkpoint, spec: Preprocessing, staged: Path, graphs: dict[str, GraphSpec]) -> Any:
    """Each photo at its own input size, through graphs traced with a dynamic height and width; every
    output against PyTorch in float32 and float64 (outputs of different sizes compared flattened)."""
    inputs = [preprocess_batch([Decoded(p, p.size)], spec) for p in sample_photos()]
    sessions = {}
    for graph, attention in (("main", False), ("attention", True)):
        spec_ = graphs[graph]
        height, width = torch.export.Dim("height", min=16, max=8192), torch.export.Dim("width", min=16, max=8192)
        to_onnx(Detector(ckpt.model, attention), (torch.from_numpy(np.concatenate([inputs[0]] * 2)),),
                staged / spec_.file, ["pixel_values"], [t.name for t in spec_.outputs],
                dynamic_shapes={"pixel_values": {0: BATCH, 2: height, 3: width}})  # fmt: skip
        sessions[graph] = ort.InferenceSession(str(staged / spec_.file), providers=["CPUExecutionProvider"])
    reference = Detector(ckpt.model, attention=True)
    names = ["main.logits", "main.boxes", *(f"attention.{t.name}" for t in graphs["attention"].outputs)]
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {name: [] for name in names}
    for x in [*inputs, np.concatenate([inputs[0]] * 3)]:  # one at a time, and a batch of three
        main, full = (sessions[graph].run(None, {"pixel_values": x}) for graph in ("main", "attention"))
        single, double = torch_outputs(reference, x), torch_outputs(reference, x, double=True)
        for name, *arrays in zip(names, [*main, *full], [*single[:2], *single], [*double[:2], *double], strict=True):
            parts[name].append(tuple(arrays))
    logits_width = parts["main.logits"][0][0].shape[-1]

    def joined(name: str, which: int) -> np.ndarray:  # logits keep their classes axis, for the argmax
        shape = (-1, logits_width) if name == "main.logits" else (-1,)
        return np.concatenate([arrays[which].reshape(shape) for arrays in parts[name]])

    return check_parity([Compared(name, *(joined(name, i) for i in range(3))) for name in names], 1)


def feature_stride(ckpt: Checkpoint) -> int:
    """Input pixels per feature cell of the backbone (32 for a ResNet-50), measured on a 64x64 input."""
    with torch.no_grad():
        out = ckpt.model(pixel_values=torch.zeros(1, 3, 64, 64), output_attentions=True)
    cells = out.encoder_attentions[-1].shape[-1]
    return 64 // int(round(cells**0.5))


# the import ---------------------------------------------------------------------------------------


def import_checkpoint(folder: Path, repository: Path, name: str, version: int = 1, force: bool = False) -> Manifest:
    """Export `folder` to `repository/name/version/`; nothing is written unless every check passes."""
    target = repository / name / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it, or choose another --version")
    if SUPPORTED[architecture_of(folder)].task == GENERATION:
        from export import hf_imagegpt  # imports this module

        return hf_imagegpt.import_checkpoint(folder, repository, name, version, force)
    ckpt = load(folder)
    data = {"source": "hugging face checkpoint", "folder": folder.resolve().name}
    return export_checkpoint(ckpt, repository, name, version, force, data)


def export_checkpoint(
    ckpt: Checkpoint,
    repository: Path,
    name: str,
    version: int,
    force: bool,
    data: dict[str, Any],
    quality: dict[str, float] | None = None,
    training: dict[str, Any] | None = None,
) -> Manifest:
    """Publish a checkpoint in memory (loaded from a folder, or fine-tuned from one: export.finetune) past
    the preprocessing and parity gates; `data`, `quality` and `training` go into its manifest."""
    cfg, family = ckpt.model.config, ckpt.family
    labels = [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
    spec = preprocessing_of(ckpt.processor, family.task)
    prep_error = preprocessing_error(ckpt.processor, spec, sample_photos())
    if prep_error > PREPROCESSING_TOLERANCE:
        raise ExportError(f"the service's preprocessing differs from {type(ckpt.processor).__name__}'s by "
                          f"{prep_error:.3g}; nothing was written")  # fmt: skip
    detector = family.task == DETECTION
    graphs = (
        detector_graphs(cfg, len(labels))
        if detector
        else classifier_graphs(cfg, spec, len(labels), family.prefix_tokens)
    )
    parity_of: Callable[..., Any] = detector_parity if detector else classifier_parity
    with staging(name, version) as staged:
        parity = parity_of(ckpt, spec, staged, graphs)
        require_parity(parity)
        manifest = Manifest(
            name=name, version=version, task=family.task, architecture=ckpt.architecture, graphs=graphs,
            preprocessing=spec, labels=labels,
            data={**data, "image_processor": type(ckpt.processor).__name__, "preprocessing_max_abs_diff": prep_error,
                  "parity_images": "scikit-learn sample photos and crops of them"},
            quality=quality or {}, parity=parity, opset=OPSET, versions={**library_versions(), **hf_versions()},
            training=training or {}, config=ckpt.config, prefix_tokens=family.prefix_tokens,
            feature_stride=feature_stride(ckpt) if detector else None,
        )  # fmt: skip
        publish(manifest, staged, repository, force)
    return manifest


def hf_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"transformers": transformers.__version__, "safetensors": safetensors.__version__}


def main(argv: list[str] | None = None, prog: str = "python -m export.hf") -> Manifest:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("folder", type=Path, metavar="DIR", help="a Hugging Face checkpoint folder")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    args = parser.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        manifest = import_checkpoint(args.folder, args.repository, args.name, args.version, args.force)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    summary = {
        "published": f"{args.repository}/{manifest.name}/{manifest.version}",
        "architecture": manifest.architecture,
        "preprocessing_max_abs_diff": manifest.data["preprocessing_max_abs_diff"],
        "parity": manifest.parity.model_dump(),
    }
    print(json.dumps(summary))
    return manifest


if __name__ == "__main__":
    main()
