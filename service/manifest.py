"""The model manifest: the one contract between `export/` (which writes it) and the service (which
reads it). The service learns everything about a model from here, nothing from code.

Layout of a repository (Triton-like): `<repository>/<name>/<version>/manifest.json` beside the ONNX
graphs it names, and an optional `<repository>/<name>/config.json` holding the model's version
policy, in Triton's words (default: the highest version is served).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"  # beside a model's version folders: its version policy

ScoreActivation = Literal["softmax", "sigmoid"]
DType = Literal["float32", "float16", "int64", "int32", "uint8", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: DType
    # ints are fixed sizes, strings are named dynamic axes (e.g. "batch")
    shape: list[int | str]
    # inclusive bounds for every value (an index into an embedding table, say); checked before a
    # request joins a batch, so one bad index cannot fail its neighbours
    range: tuple[float, float] | None = None


class GraphSpec(_Strict):
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Preprocessing(_Strict):
    """How an RGB image becomes the model's input tensor `[channels, height, width]`."""

    color_mode: Literal["L", "RGB"]
    size: tuple[int, int] = Field(
        description="(height, width) of the model input (shortest_edge without crop: the largest it can be)"
    )
    # stretch: resized to `size` whatever its aspect; letterbox: scaled to fit with its aspect kept,
    # placed at the top left and padded with `fill` on the right or bottom; shortest_edge: as Hugging
    # Face image processors do, the shorter side scaled to `shortest_edge` with the aspect kept (and
    # the longer side capped at `longest_edge`): each image keeps its own size unless `crop` follows
    resize: Literal["stretch", "letterbox", "shortest_edge"] = "stretch"
    fill: int = Field(0, ge=0, le=255, description="padding value (letterbox)")
    resample: Literal["nearest", "box", "bilinear", "bicubic", "lanczos"] = "bilinear"
    shortest_edge: int | None = Field(None, ge=1, description="shortest_edge: the shorter side's length")
    longest_edge: int | None = Field(None, ge=1, description="shortest_edge: the longer side's cap")
    size_multiple: int | None = Field(
        None, ge=1, description="shortest_edge: YOLOS's size arithmetic, each side floored to a multiple of this (16)"
    )
    crop: tuple[int, int] | None = Field(None, description="(height, width) of a centre crop after resizing")
    stretch_to: tuple[int, int] | None = Field(None, description="stretch with crop: (height, width) before it")
    # pixels (0..255) times this, then (x - mean) / std, per channel
    rescale_factor: float = Field(1 / 255, gt=0)
    mean: list[float]
    std: list[float]
    # JPEGs may decode at reduced scale where the input is much smaller (see service.imaging); an
    # imported model decodes in full, so that it sees the pixels its own library would
    reduced_decode: bool = True

    @model_validator(mode="after")
    def _channels_agree(self) -> Preprocessing:
        channels = len(self.color_mode)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} value(s) for color_mode {self.color_mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        if self.resize == "shortest_edge" and self.shortest_edge is None:
            raise ValueError("resize shortest_edge needs `shortest_edge`")
        if self.crop is not None and tuple(self.crop) != tuple(self.size):
            raise ValueError("after a centre crop the model input `size` is the crop's")
        return self

    @property
    def fixed_size(self) -> bool:
        """Every image becomes an input of `size` (else each keeps its own resized size)."""
        return self.resize != "shortest_edge" or self.crop is not None

    @property
    def smallest_side(self) -> int:
        """The least height or width an input of this recipe has (a resized side is at least 1, or one multiple)."""
        return self.size_multiple or 1

    @property
    def channels(self) -> int:
        return len(self.color_mode)


class OutputParity(_Strict):
    """One output of one graph, on the held-out inputs, against PyTorch float32 and float64."""

    name: str = Field(description="'<graph>.<output>'")
    max_abs_diff: float = Field(description="ONNX Runtime against PyTorch float32")
    # max(1e-4, twice `float32_error`), capped: two float32 implementations cannot agree more
    # closely than each agrees with exact arithmetic, but no output may drift further than the cap
    tolerance: float
    float32_error: float = Field(description="PyTorch float32 against float64 on the same inputs")
    onnx_float64_error: float = Field(description="ONNX Runtime against PyTorch float64")


class Parity(_Strict):
    """ONNX Runtime against PyTorch on held-out inputs, measured at export. The top-level figures are
    those of the output closest to its tolerance; `outputs` has every one (empty in older manifests)."""

    max_abs_diff: float
    tolerance: float
    float32_error: float = Field(0.0, description="PyTorch float32 against float64 on the same inputs")
    batch_size: int
    traced_batch_size: int
    argmax_equal: bool
    cap: float | None = Field(None, description="the most any output's tolerance may widen to")
    outputs: list[OutputParity] = Field(default_factory=list)


class QualityGate(_Strict):
    """A float16 conversion measured against its float32 graphs on held-out data (in place of the
    parity gate, which float16 cannot meet): the figure, both ways, and the most it may differ by."""

    metric: str = Field(description="argmax_agreement (at least `bound`), map or bits_per_dim (within `bound`)")
    float32: float
    float16: float
    bound: float
    samples: int


class QuantizationGate(_Strict):
    """An INT8 version measured against the float32 version it was quantized from, on held-out (or
    calibration) images: each figure both ways, the bounds, and whether it passed (a forced publish
    records a failed gate)."""

    method: Literal["dynamic"] = Field(description="ONNX Runtime's dynamic quantization of MatMul and Gemm weights")
    source_version: int
    samples: int
    figures: dict[str, tuple[float, float]] = Field(description="name -> (float32, int8)")
    bounds: dict[str, float] = Field(description="top1_agreement at least; accuracy and map within")
    passed: bool


class BatchPolicy(_Strict):
    """Dynamic batching defaults for a model; settings can override them per model."""

    max_batch_size: int = Field(32, ge=1, description="most images in one run")
    # 0: never wait; batches form from the requests that queue while the previous batch runs
    max_queue_delay_ms: float = Field(0.0, ge=0, description="longest wait for more requests to join a batch")
    max_queue_size: int = Field(256, ge=1, description="most images waiting; beyond it requests get 503")


class TextTower(_Strict):
    """A zero-shot model's text side: its tokenizer (the `tokenizers` library's JSON, beside the graphs),
    padded and truncated as transformers' zero-shot pipeline pads for the family, and the scale (and
    bias) that turn a cosine similarity into a logit."""

    tokenizer: str = Field(description="file name of the tokenizer.json")
    padding: Literal["longest", "max_length"] = Field(description="pad to the longest label, or to max_length")
    max_length: int = Field(ge=1, description="most tokens a label's text keeps (truncated past it)")
    pad_id: int = Field(ge=0)
    logit_scale: float = Field(gt=0, description="exp(the model's logit_scale)")
    logit_bias: float = 0.0


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    task: str
    architecture: str
    graphs: dict[str, GraphSpec] = Field(description="'main' serves requests; others are optional extras")
    preprocessing: Preprocessing
    labels: list[str]
    data: dict[str, Any] = Field(description="what the model was trained and evaluated on")
    quality: dict[str, float] = Field(description="held-out figures, e.g. top1")
    parity: Parity
    opset: int
    versions: dict[str, str] = Field(description="library versions at export")
    training: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="the model's config dataclass")
    serving: BatchPolicy = Field(default_factory=BatchPolicy)
    # the attention graphs' layout: tokens before the patches (ViT's CLS; DeiT's CLS and distillation),
    # and a detector's input pixels per feature cell (None: a square grid over the square input)
    prefix_tokens: int = Field(1, ge=0)
    feature_stride: int | None = Field(None, ge=1)
    # detection: softmax over the labels and a last "no object" class, the best label per query (DETR,
    # YOLOS); or sigmoid, an independent score per query and label, the best pairs over all (Conditional DETR)
    score_activation: ScoreActivation = "softmax"
    absent_graphs: dict[str, str] = Field(
        default_factory=dict, description="graphs deliberately not exported, and why (the routes needing one say it)"
    )
    precision: Literal["float32", "float16", "int8"] = Field(
        "float32", description="of the main graph's weights and math"
    )
    fp16_gate: QualityGate | None = Field(None, description="the float16 conversion's quality gate, if converted")
    int8_gate: QuantizationGate | None = Field(None, description="the INT8 quantization's quality gate, if quantized")
    also_serves: list[str] = Field(
        default_factory=list, description="tasks its graphs answer besides `task` (CLIP: embedding beside zero-shot)"
    )
    text: TextTower | None = Field(None, description="zero-shot: how labels become the text graph's inputs")

    @model_validator(mode="after")
    def _has_main_graph(self) -> Manifest:
        if "main" not in self.graphs:
            raise ValueError("graphs must include 'main'")
        return self

    @property
    def main(self) -> GraphSpec:
        return self.graphs["main"]

    @property
    def tasks(self) -> list[str]:
        """Every task it serves: its own first."""
        return [self.task, *self.also_serves]


class GenerationConfig(BaseModel):
    """The part of a generation model's config that sampling needs (the manifest's `config`): the
    Image Transformer's, or an imported ImageGPT's (export/hf_imagegpt.py). Both decode tokens in
    raster order from a start token, one cached step per pixel; the manifest says what a token means."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    height: int
    width: int
    levels: int  # tokens per pixel; the start token is `levels` (ImageGPT's SOS, vocab_size - 1, is too)
    # "no label" is `num_classes`; 0: unconditional only, and the graphs take no `labels` input
    num_classes: int
    layers: int
    heads: int
    dim: int
    memory: int
    # None: token t is grey level t of `levels`. Else token t is the colour cluster `palette[t]`, RGB
    # in [-1, 1] as ImageGPT's image processor holds them: an image's pixels become their nearest
    # cluster, and a token is drawn as the colour round((c + 1) * 127.5)
    palette: list[tuple[float, float, float]] | None = None

    @property
    def length(self) -> int:
        return self.height * self.width

    @property
    def conditional(self) -> bool:
        """Whether the graphs take a class label per image."""
        return self.num_classes > 0

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(heads, memory, head_dim): one cache tensor per layer and per key/value, after the batch."""
        return self.heads, self.memory, self.dim // self.heads


# The built-in tasks, as manifests name them, and what each needs of a manifest (a task's check; a
# task added beside them brings its own). Here, in the core, so that export names a task without
# the service's tasks.
CLASSIFICATION, DETECTION, GENERATION = "classification", "detection", "generation"
EMBEDDING, ZERO_SHOT = "embedding", "zero-shot"
POOLINGS = ("pooled", "cls", "mean")  # an embedding graph's outputs, in this order (a model without CLS lacks it)


def check_classification(manifest: Manifest) -> None:
    main = manifest.main
    if len(main.inputs) != 1 or len(main.inputs[0].shape) != 4:
        raise ValueError("a classification graph takes one image batch [batch, channels, height, width]")
    if main.outputs[0].shape[-1] != len(manifest.labels):
        raise ValueError(
            f"the graph gives {main.outputs[0].shape[-1]} logits but there are {len(manifest.labels)} labels"
        )


def check_detection(manifest: Manifest) -> None:
    main = manifest.main
    names = [t.name for t in main.outputs]
    if len(main.inputs) != 1 or names != ["logits", "boxes"]:
        raise ValueError("a detection graph takes one image batch and gives 'logits' and 'boxes'")
    no_object = manifest.score_activation == "softmax"  # its last class
    if main.outputs[0].shape[-1] != len(manifest.labels) + no_object:
        raise ValueError(
            f"the graph gives {main.outputs[0].shape[-1]} classes; {manifest.score_activation} scoring needs "
            f"{len(manifest.labels)} labels" + (" + no object" if no_object else "")
        )


def check_generation(manifest: Manifest) -> None:
    cfg = GenerationConfig.model_validate(manifest.config)
    if "step" not in manifest.graphs:
        raise ValueError("a generation model needs a 'step' graph (cached decoding)")
    if len(manifest.labels) != cfg.num_classes:
        raise ValueError(f"{len(manifest.labels)} labels for {cfg.num_classes} classes")
    if cfg.palette is not None and len(cfg.palette) != cfg.levels:
        raise ValueError(f"a palette of {len(cfg.palette)} colours for {cfg.levels} tokens")


def check_embedding(manifest: Manifest) -> None:
    main = manifest.main
    names = [t.name for t in main.outputs]
    if len(main.inputs) != 1 or "pooled" not in names or names != [p for p in POOLINGS if p in names]:
        raise ValueError(f"an embedding graph takes one image batch and gives 'pooled' and any of {POOLINGS[1:]}")
    if any(len(t.shape) != 2 for t in main.outputs):
        raise ValueError("each embedding output is [batch, dimensions]")


def check_zero_shot(manifest: Manifest) -> None:
    check_embedding(manifest)
    text = manifest.graphs.get("text")
    if text is None or manifest.text is None:
        raise ValueError("a zero-shot model needs a 'text' graph and its `text` tokenizer settings")
    if text.inputs[0].name != "input_ids" or [t.name for t in text.outputs] != ["text_embeds"]:
        raise ValueError("the text graph takes input_ids (and attention_mask) and gives text_embeds")
    if text.outputs[0].shape[-1] != manifest.main.outputs[0].shape[-1]:
        raise ValueError("text and image embeddings differ in size")


TASK_CHECKS: dict[str, Callable[[Manifest], None]] = {
    CLASSIFICATION: check_classification,
    DETECTION: check_detection,
    GENERATION: check_generation,
    EMBEDDING: check_embedding,
    ZERO_SHOT: check_zero_shot,
}


class Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class Specific(_Strict):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Which of a model's versions are served, as Triton's `version_policy`: the latest N (default
    1), all, or specific ones; exactly one of the three."""

    latest: Latest | None = None
    all: dict[str, Any] | None = None
    specific: Specific | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        if sum(kind is not None for kind in (self.latest, self.all, self.specific)) > 1:
            raise ValueError("a version policy is one of latest, all or specific")
        return self

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve of those present, highest first."""
        present = sorted(versions, reverse=True)
        if self.all is not None:
            return present
        if self.specific is not None:
            return [v for v in present if v in self.specific.versions]
        return present[: (self.latest or Latest()).num_versions]


class ModelConfig(_Strict):
    """`<name>/config.json`: what belongs to a model across its versions (Triton's model config, of
    which this service reads the version policy)."""

    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    return ModelConfig.model_validate_json(path.read_text()) if path.is_file() else ModelConfig()


def read_manifest(version_dir: Path) -> Manifest:
    return Manifest.model_validate_json((version_dir / MANIFEST_FILE).read_text())


def write_manifest(manifest: Manifest, version_dir: Path) -> None:
    (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
