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
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from export.onnx_export import (
    BATCH,
    OPSET,
    Compared,
    ExportError,
    ParityRuns,
    library_versions,
    parity_chunk,
    publish,
    require_parity,
    staging,
    to_onnx,
    torch_outputs,
    trace_image_graph,
)
from service.imaging import Decoded, preprocess_batch
from service.manifest import (
    CLASSIFICATION,
    DETECTION,
    EMBEDDING,
    GENERATION,
    ZERO_SHOT,
    GraphSpec,
    Manifest,
    Preprocessing,
    ScoreActivation,
    TensorSpec,
)
from service.settings import PROJECT_ROOT

# PIL's filter numbers, as image processors store them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}
PREPROCESSING_TOLERANCE = 1e-5  # the service's input tensor against the image processor's
# image processors that floor each resized side to a multiple (get_size_with_aspect_ratio_yolos's mod_size)
SIZE_MULTIPLE = {"YolosImageProcessorPil": 16}
PROBE_SIDE = 64  # a detector's graph shapes and feature stride are read from a run at this size


def detr_attention(out: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """DETR-style outputs -> (encoder self-attention `[batch, layers, heads, cells, cells]`, decoder
    cross-attention `[batch, layers, heads, queries, cells]`)."""
    return torch.stack(out.encoder_attentions, 1), torch.stack(out.cross_attentions, 1)


def yolos_attention(out: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """YOLOS's one stack of global attention over [CLS, patches, detection tokens] -> the same two
    shapes: patches over patches, and each detection token over the patches (its share of attention
    that lands on the image: rows do not sum to 1, as the rest goes to CLS and the detection tokens)."""
    attention, queries = torch.stack(out.attentions, 1), config.num_detection_tokens
    return attention[..., 1:-queries, 1:-queries], attention[..., -queries:, 1:-queries]


DetectorAttention = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Family:
    """What the importer knows of one transformers architecture."""

    task: str
    prefix_tokens: int = 1  # classification: tokens before the patches (a config's register tokens add to it)
    no_attention: str | None = None  # why no attention graph is exported, where none is
    scores: ScoreActivation = "softmax"  # detection: softmax with a last "no object" class, or sigmoid
    detector_attention: DetectorAttention = detr_attention  # detection: the attention graph's two outputs


SWIN_ATTENTION = ("Swin attends within shifted local windows that change from layer to layer: it has no "
                  "attention from one token to every patch to map or roll out")  # fmt: skip

SUPPORTED: dict[str, Family] = {
    "ViTForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),
    "DeiTForImageClassification": Family(CLASSIFICATION, prefix_tokens=2),  # CLS and distillation tokens
    # transformers averages its two heads (CLS and distillation) into `logits`; so does the graph
    "DeiTForImageClassificationWithTeacher": Family(CLASSIFICATION, prefix_tokens=2),
    "DetrForObjectDetection": Family(DETECTION),
    "BeitForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),  # relative position bias: exports too
    "SwinForImageClassification": Family(CLASSIFICATION, no_attention=SWIN_ATTENTION),
    # the head reads CLS and the mean of the patch tokens; registers sit between them (prefix 1 + registers)
    "Dinov2ForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),
    "Dinov2WithRegistersForImageClassification": Family(CLASSIFICATION, prefix_tokens=1),
    "YolosForObjectDetection": Family(DETECTION, detector_attention=yolos_attention),
    "ConditionalDetrForObjectDetection": Family(DETECTION, scores="sigmoid"),  # no "no object" class
    "ImageGPTForCausalImageModeling": Family(GENERATION),  # imported by export/hf_imagegpt.py
    # bare models (no head): their vectors; CLIP and SigLIP also score labels (export/hf_embed.py imports all four)
    "ViTModel": Family(EMBEDDING, prefix_tokens=1),
    "Dinov2Model": Family(EMBEDDING, prefix_tokens=1),
    "CLIPModel": Family(ZERO_SHOT, prefix_tokens=1),
    "SiglipModel": Family(ZERO_SHOT, prefix_tokens=0),  # no CLS token: attention pooling over the patches
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

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: the family's, and the register tokens its config adds (DINOv2)."""
        return self.family.prefix_tokens + int(getattr(self.model.config, "num_register_tokens", 0))


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
        # mismatched shapes load (as new random tensors) to be reported by name below, not in a log
        options = {"attn_implementation": "eager", "output_loading_info": True, "ignore_mismatched_sizes": True}
        model, loading = model_class.from_pretrained(folder, local_files_only=True, **options)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a truncated safetensors file, a broken JSON, missing weights...
        raise ExportError(f"{folder} could not be loaded by transformers: {type(exc).__name__}: {exc}") from exc
    require_all_weights(folder, loading)
    model.eval()
    if getattr(processor, "backend", "pil") != "pil":
        raise ExportError(f"the image processor {type(processor).__name__} is not the PIL one the service replicates")
    problem = getattr(model.config, "problem_type", None)
    if SUPPORTED[architecture].task not in (EMBEDDING, ZERO_SHOT) and (
        problem not in (None, "single_label_classification") or model.config.num_labels < 2
    ):
        raise ExportError(f"only softmax classifiers are imported (problem_type {problem!r})")
    return Checkpoint(folder, architecture, SUPPORTED[architecture], model, processor, model.config.to_dict())


def require_all_weights(folder: Path, loading: dict[str, Any]) -> None:
    """transformers fills weights missing from the file (or of another shape, where allowed) with new
    random ones and only warns: such a model is not the checkpoint, so it is refused."""
    problems = {
        "missing from the weights file (transformers would initialise them at random)": loading["missing_keys"],
        "of another shape than the config makes": [
            f"{key} {list(saved)} in the file, {list(wanted)} by the config"
            for key, saved, wanted in loading.get("mismatched_keys", [])
        ],
        "failing to load": loading.get("error_msgs", []),
    }
    found = [f"{len(keys)} tensors {what}: {', '.join(sorted(keys)[:5])}" for what, keys in problems.items() if keys]
    if found:
        raise ExportError(f"{folder}'s weights do not match its config.json: {'; '.join(found)}")


def preprocessing_of(processor: Any, task: str) -> Preprocessing:
    """The image processor's recipe in the manifest's words."""
    p, name = processor, type(processor).__name__
    size, resample = dict(p.size or {}), RESAMPLE.get(int(p.resample))
    if not p.do_resize:
        raise ExportError(f"{name} has do_resize=False: the service always resizes (to a size or by the shortest edge)")
    if resample is None:
        raise ExportError(f"{name}'s resample={int(p.resample)} is not supported; supported filters: "
                          + ", ".join(f"{number} ({filter_})" for number, filter_ in RESAMPLE.items()))  # fmt: skip
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
            "size_multiple": SIZE_MULTIPLE.get(name),
        }
    else:
        raise ExportError(f"{name}'s size {size} is not supported; supported: height and width, or shortest_edge "
                          "(with longest_edge or not)")  # fmt: skip
    if getattr(p, "do_center_crop", False):
        crop = (p.crop_size["height"], p.crop_size["width"])
        if recipe["resize"] == "stretch":
            recipe["stretch_to"] = recipe["size"]
        recipe |= {"crop": crop, "size": crop}
    elif task in (CLASSIFICATION, EMBEDDING, ZERO_SHOT) and recipe["resize"] == "shortest_edge":
        raise ExportError(f"a {task} model resized by its shortest edge needs a centre crop (a fixed input size)")
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
    the image), and with `attention` the family's encoder self-attention and queries' attention over cells."""

    def __init__(self, model: torch.nn.Module, attention: DetectorAttention | None = None) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, output_attentions=self.attention is not None)
        if self.attention is None:
            return out.logits, out.pred_boxes
        return out.logits, out.pred_boxes, *self.attention(out, self.model.config)


def f32(name: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=list(shape))


def classifier_graphs(ckpt: Checkpoint, spec: Preprocessing, labels: int) -> dict[str, GraphSpec]:
    image = f32("pixel_values", "batch", 3, *spec.size)
    logits = f32("logits", "batch", labels)
    graphs = {"main": GraphSpec(file="model.onnx", inputs=[image], outputs=[logits])}
    if ckpt.family.no_attention is None:
        cfg = ckpt.model.config
        tokens = (spec.size[0] // cfg.patch_size) * (spec.size[1] // cfg.patch_size) + ckpt.prefix_tokens
        attention = f32("attention", "batch", cfg.num_hidden_layers, cfg.num_attention_heads, tokens, tokens)
        graphs["attention"] = GraphSpec(file="attention.onnx", inputs=[image], outputs=[logits, attention])
    return graphs


@torch.no_grad()
def detector_graphs(ckpt: Checkpoint) -> tuple[dict[str, GraphSpec], int]:
    """The graphs, their outputs' sizes read from a run on a PROBE_SIDE square, and the input pixels per
    feature cell (32 for a ResNet-50, the patch size for YOLOS)."""
    probe = torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE)
    logits, _, encoder, cross = Detector(ckpt.model, ckpt.family.detector_attention)(probe)
    (_, queries, classes), (_, layers, heads, cells, _) = logits.shape, encoder.shape
    image = f32("pixel_values", "batch", 3, "height", "width")
    outputs = [f32("logits", "batch", queries, classes), f32("boxes", "batch", queries, 4)]
    attention = [
        f32("encoder_attention", "batch", layers, heads, "cells", "cells"),
        f32("decoder_attention", "batch", *cross.shape[1:3], queries, "cells"),
    ]
    graphs = {
        "main": GraphSpec(file="model.onnx", inputs=[image], outputs=outputs),
        "attention": GraphSpec(file="attention.onnx", inputs=[image], outputs=outputs + attention),
    }
    return graphs, PROBE_SIDE // math.isqrt(cells)


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
    """Every output of every graph against PyTorch in float32 and float64, on photos and their flips,
    in chunks that bound memory (parity_chunk)."""
    photos = sample_photos()
    inputs = preprocess_batch([Decoded(p, p.size) for p in photos], spec)
    inputs = np.concatenate([inputs, inputs[:, :, ::-1].copy(), inputs[:, :, :, ::-1].copy()])  # flips: more cases
    attention = "attention" in graphs
    reference, traced = Classifier(ckpt.model, attention=attention), graphs["attention" if attention else "main"]
    session = trace_image_graph(reference, inputs, staged, traced)
    main = main_cut_from_attention(staged, graphs) if attention else session
    names = ["main.logits", *(f"attention.{t.name}" for t in traced.outputs if attention)]
    runs, chunk = ParityRuns(names), parity_chunk(traced)
    for i in range(0, len(inputs), chunk):
        x = inputs[i : i + chunk]
        single, double = torch_outputs(reference, x), torch_outputs(reference, x, double=True)
        ours = main.run(None, {"pixel_values": x})[:1] + (session.run(None, {"pixel_values": x}) if attention else [])
        for name, *arrays in zip(names, ours, [single[0], *single], [double[0], *double], strict=False):
            runs.add(Compared(name, *arrays))
    return runs.parity(min(chunk, len(inputs)))


def main_cut_from_attention(staged: Path, graphs: dict[str, GraphSpec]) -> ort.InferenceSession:
    """The main graph: the attention graph less its attention outputs (the very nodes a trace of its own
    gives, in one trace, not two: tracing is most of an import's time)."""
    main, full = graphs["main"], graphs["attention"]
    onnx.utils.extract_model(str(staged / full.file), str(staged / main.file), [t.name for t in main.inputs],
                             [t.name for t in main.outputs])  # fmt: skip
    return ort.InferenceSession(str(staged / main.file), providers=["CPUExecutionProvider"])


def detector_parity(ckpt: Checkpoint, spec: Preprocessing, staged: Path, graphs: dict[str, GraphSpec]) -> Any:
    """Each photo at its own input size, through graphs traced with a dynamic height and width; every
    output against PyTorch in float32 and float64 (outputs of different sizes compared flattened)."""
    inputs = [preprocess_batch([Decoded(p, p.size)], spec) for p in sample_photos()]
    reference, traced = Detector(ckpt.model, ckpt.family.detector_attention), graphs["attention"]
    height, width = torch.export.Dim("height", min=16, max=8192), torch.export.Dim("width", min=16, max=8192)
    to_onnx(reference, (torch.from_numpy(np.concatenate([inputs[0]] * 2)),), staged / traced.file,
            ["pixel_values"], [t.name for t in traced.outputs],
            dynamic_shapes={"pixel_values": {0: BATCH, 2: height, 3: width}})  # fmt: skip
    sessions = {
        "main": main_cut_from_attention(staged, graphs),
        "attention": ort.InferenceSession(str(staged / traced.file), providers=["CPUExecutionProvider"]),
    }
    names = ["main.logits", "main.boxes", *(f"attention.{t.name}" for t in graphs["attention"].outputs)]
    runs = ParityRuns(names)  # each run's arrays freed after it: a real-size YOLOS's attention is 0.5 GB an image
    for x in [*inputs, np.concatenate([inputs[0]] * 3)]:  # one at a time, and a batch of three
        main, full = (sessions[graph].run(None, {"pixel_values": x}) for graph in ("main", "attention"))
        single, double = torch_outputs(reference, x), torch_outputs(reference, x, double=True)
        for name, *arrays in zip(names, [*main, *full], [*single[:2], *single], [*double[:2], *double], strict=True):
            flat = (-1, arrays[0].shape[-1]) if name == "main.logits" else (-1,)  # logits keep their classes axis
            runs.add(Compared(name, *(a.reshape(flat) for a in arrays)))
        del main, full, single, double
    return runs.parity(1)


# the import ---------------------------------------------------------------------------------------


def import_checkpoint(folder: Path, repository: Path, name: str, version: int = 1, force: bool = False) -> Manifest:
    """Export `folder` to `repository/name/version/`; nothing is written unless every check passes."""
    target = repository / name / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it, or choose another --version")
    if SUPPORTED[architecture_of(folder)].task == GENERATION:
        from export import hf_imagegpt  # imports this module

        return hf_imagegpt.import_checkpoint(folder, repository, name, version, force)
    if SUPPORTED[architecture_of(folder)].task in (EMBEDDING, ZERO_SHOT):
        from export import hf_embed  # imports this module

        return hf_embed.import_checkpoint(folder, repository, name, version, force)
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
    graphs, stride = detector_graphs(ckpt) if detector else (classifier_graphs(ckpt, spec, len(labels)), None)
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
            training=training or {}, config=ckpt.config, prefix_tokens=ckpt.prefix_tokens, feature_stride=stride,
            score_activation=family.scores,
            absent_graphs={"attention": family.no_attention} if family.no_attention else {},
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
    except Exception as exc:  # transformers or the exporter failing on this checkpoint: one line, not a trace
        logging.getLogger("export").debug("export failed", exc_info=True)
        print(f"error: {args.folder} could not be exported: {type(exc).__name__}: {exc}; nothing was written",
              file=sys.stderr)  # fmt: skip
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
