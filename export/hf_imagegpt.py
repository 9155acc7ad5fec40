"""ImageGPT (`ImageGPTForCausalImageModeling` with its `ImageGPTImageProcessor`) imported as a generation
model, served by the same task as the Image Transformer (`python -m export.hf DIR --name NAME` hands such a
folder here).

ImageGPT models an image as a sequence of colour-cluster tokens in raster order after a start token
(SOS, vocab_size - 1): the image processor resizes an image to the model's size and maps each pixel,
normalized to [-1, 1], to its nearest cluster. The export writes the Image Transformer's three graphs
(scoring, attention, a cached decoding step with the key/value cache as inputs and outputs, plus its
pooled form that keeps the cache on the device) and the palette in the manifest, and publishes only if:
the service turns photos into the processor's tokens exactly; every graph agrees with transformers;
greedy decoding through the service's sampler gives `model.generate(do_sample=False)`'s tokens, from the
SOS token and primed; and scores match transformers' loss within 1e-4 bits per dimension.

Bits per dimension: transformers' loss (cross-entropy of each token given those before it, the labels
shifted inside the model) over the whole sequence SOS + every pixel, in bits. A checkpoint whose
n_positions is the pixel count (all of OpenAI's) cannot take SOS + every pixel in one call, but the loss
only ever reads the logits of SOS + all pixels but the last, which it can: the graphs run on those.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from export.hf import hf_versions, preprocessing_of, sample_photos
from export.onnx_export import (
    BATCH,
    OPSET,
    TRACED_BATCH,
    Compared,
    ExportError,
    ParityRuns,
    images_within,
    library_versions,
    publish,
    require_parity,
    staging,
    to_onnx,
)
from export.pooled import write_pooled
from service.imaging import Decoded, preprocess_batch
from service.manifest import (
    GENERATION,
    GenerationConfig,
    GraphSpec,
    Manifest,
    Parity,
    Preprocessing,
    TensorSpec,
)
from service.memory import give_back_big_blocks
from service.outputs import image_to_tokens
from service.sampling import POOLED_GRAPH, cache_names, sample

ARCHITECTURE = "ImageGPTForCausalImageModeling"
SCORE_TOLERANCE_BITS = 1e-4  # bits per dimension, ONNX against transformers
PARITY_BATCH = 5


# the checkpoint -----------------------------------------------------------------------------------


def load(folder: Path) -> tuple[Any, Any]:
    """The model (eager attention: the attention graph returns its weights) and its PIL image processor."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.ImageGPTForCausalImageModeling.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager"
        ).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a truncated safetensors file, a broken JSON, missing weights...
        raise ExportError(f"{folder} could not be loaded by transformers: {type(exc).__name__}: {exc}") from exc
    if getattr(processor, "backend", "pil") != "pil":
        raise ExportError(f"the image processor {type(processor).__name__} is not the PIL one the service replicates")
    return model, processor


def generation_config(model: Any, processor: Any) -> dict[str, Any]:
    """The manifest's `config`: the GenerationConfig fields (an unconditional model whose tokens are the
    processor's colour clusters), beside transformers' own config. ExportError where the folder is not
    the layout the service decodes."""
    cfg, clusters = model.config, getattr(processor, "clusters", None)
    size = dict(processor.size or {})
    height, width = size.get("height"), size.get("width")
    if not getattr(processor, "do_color_quantize", False) or clusters is None:
        raise ExportError("the image processor does not colour-quantize (no clusters): not an ImageGPT generator")
    if not (height and width):
        raise ExportError(f"the image processor's size {size} is not a fixed height and width")
    palette = np.asarray(clusters, dtype=np.float64)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) != cfg.vocab_size - 1:
        raise ExportError(f"{len(palette)} clusters for a vocabulary of {cfg.vocab_size} (clusters + SOS)")
    if cfg.n_positions < height * width:
        raise ExportError(f"n_positions {cfg.n_positions} is fewer than the {height}x{width} pixels")
    if cfg.add_cross_attention:
        raise ExportError("ImageGPT with cross-attention is not a plain image generator")
    # tokens are drawn as round((c + 1) * 127.5): the processor must map 0..255 onto [-1, 1]
    unit = processor.do_rescale and math.isclose(processor.rescale_factor, 1 / 255)
    if not (unit and processor.do_normalize and list(processor.image_mean) == list(processor.image_std) == [0.5] * 3):
        raise ExportError("the image processor does not normalize pixels to [-1, 1] as ImageGPT's does")
    fields = {"height": height, "width": width, "levels": len(palette), "num_classes": 0, "layers": cfg.n_layer,
              "heads": cfg.n_head, "dim": cfg.n_embd, "memory": height * width,
              "palette": palette.tolist()}  # fmt: skip
    return {**fields, "transformers_config": cfg.to_dict()}


# the graphs ---------------------------------------------------------------------------------------


def shifted_in(pixels: torch.Tensor, start: int) -> torch.Tensor:
    """pixels `[batch, length]` -> the model's input: SOS, then every pixel but the last."""
    return torch.cat([torch.full_like(pixels[:, :1], start), pixels[:, :-1]], dim=1)


class ScoreGraph(torch.nn.Module):
    """pixels `[batch, length]` -> logits `[batch, length, clusters]` (position t predicts pixel t) and
    log_likelihood `[batch]` (natural log)."""

    def __init__(self, model: Any, attention: bool = False) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.model.config.vocab_size - 1
        out = self.model(input_ids=shifted_in(pixels, start), output_attentions=self.attention)
        if self.attention:
            return out.logits, torch.stack(out.attentions, 1)
        log_likelihood = out.logits.log_softmax(-1).gather(-1, pixels[..., None])[..., 0].sum(-1)
        return out.logits, log_likelihood


class StepGraph(torch.nn.Module):
    """One decoding position per image with a fixed-size key/value cache, so requests at different
    positions share a run: previous `[batch]` (pixel t-1, or SOS), position `[batch]` (t), the cache
    `[key_0, value_0, ...]` each `[batch, heads, length, head_dim]` -> logits `[batch, clusters]` and the
    cache with slot t written. transformers' cache grows by concatenation instead, which no fixed-shape
    graph (nor the device-side pool) can hold; the arithmetic is ImageGPTAttention's own."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, previous: torch.Tensor, position: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gpt = self.model.transformer
        slots = torch.arange(cache[0].shape[2])[None, :]
        write = (slots == position[:, None])[:, None, :, None]  # [batch, 1, length, 1]
        hidden = (slots > position[:, None])[:, None, None, :]  # slots not written yet
        x = (gpt.wte(previous) + gpt.wpe(position))[:, None]  # [batch, 1, dim]
        present: list[torch.Tensor] = []
        for i, block in enumerate(gpt.h):
            attended, key, value = self.attend(block.attn, block.ln_1(x), write, hidden, cache[2 * i : 2 * i + 2])
            x = x + attended
            x = x + block.mlp(block.ln_2(x))
            present += [key, value]
        return (self.model.lm_head(gpt.ln_f(x))[:, 0], *present)

    @staticmethod
    def attend(
        attn: Any, x: torch.Tensor, write: torch.Tensor, hidden: torch.Tensor, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ImageGPTAttention (its scalings and its masking with the dtype's minimum) over the cache."""
        batch, heads = x.shape[0], attn.num_heads
        q, k, v = (t.reshape(batch, 1, heads, -1).transpose(1, 2) for t in attn.c_attn(x).split(attn.split_size, 2))
        key, value = torch.where(write, k, past[0]), torch.where(write, v, past[1])
        weights = q @ key.transpose(-1, -2)
        if attn.scale_attn_weights:
            weights = weights / float(value.shape[-1]) ** 0.5
        if attn.scale_attn_by_inverse_layer_idx:
            weights = weights / float(attn.layer_idx + 1)
        weights = weights.masked_fill(hidden, torch.finfo(weights.dtype).min).softmax(-1)
        out = (weights @ value).transpose(1, 2).reshape(batch, 1, -1)
        return attn.c_proj(out), key, value


def graphs(cfg: GenerationConfig) -> dict[str, GraphSpec]:
    """The Image Transformer's graphs (export/image_transformer.py) without the `labels` input."""
    f32 = lambda name, *shape: TensorSpec(name=name, dtype="float32", shape=list(shape))  # noqa: E731
    pixels = TensorSpec(name="pixels", dtype="int64", shape=["batch", cfg.length], range=(0, cfg.levels - 1))
    previous = TensorSpec(name="previous", dtype="int64", shape=["batch"], range=(0, cfg.levels))
    position = TensorSpec(name="position", dtype="int64", shape=["batch"], range=(0, cfg.length - 1))
    logits = f32("logits", "batch", cfg.length, cfg.levels)
    cache = ["batch", *cfg.cache_shape]
    return {
        "main": GraphSpec(file="score.onnx", inputs=[pixels], outputs=[logits, f32("log_likelihood", "batch")]),
        "attention": GraphSpec(file="attention.onnx", inputs=[pixels], outputs=[
            logits, f32("attention", "batch", cfg.layers, cfg.heads, cfg.length, cfg.length)]),
        "step": GraphSpec(file="step.onnx",
            inputs=[previous, position, *(f32(n, *cache) for n in cache_names(cfg, "past_key_values"))],
            outputs=[f32("logits", "batch", cfg.levels), *(f32(n, *cache) for n in cache_names(cfg, "present"))]),
    }  # fmt: skip


def empty_cache(cfg: GenerationConfig, batch: int) -> list[np.ndarray]:
    return [np.zeros((batch, *cfg.cache_shape), dtype=np.float32) for _ in range(2 * cfg.layers)]


def export_graphs(model: Any, cfg: GenerationConfig, folder: Path, specs: dict[str, GraphSpec]) -> None:
    pixels = torch.zeros(TRACED_BATCH, cfg.length, dtype=torch.int64)
    for name, module in (("main", ScoreGraph(model)), ("attention", ScoreGraph(model, attention=True))):
        spec = specs[name]
        to_onnx(module, (pixels,), folder / spec.file, [t.name for t in spec.inputs], [t.name for t in spec.outputs])
    step, tokens = specs["step"], torch.zeros(TRACED_BATCH, dtype=torch.int64)
    cache = tuple(torch.from_numpy(c) for c in empty_cache(cfg, TRACED_BATCH))
    dynamic = {"previous": {0: BATCH}, "position": {0: BATCH}, "cache": tuple({0: BATCH} for _ in cache)}
    to_onnx(StepGraph(model), (tokens, torch.full_like(tokens, 3), *cache), folder / step.file,
            [t.name for t in step.inputs], [t.name for t in step.outputs], dynamic)  # fmt: skip


# the gates ----------------------------------------------------------------------------------------


def photo_tokens(processor: Any, spec: Preprocessing, cfg: GenerationConfig) -> tuple[np.ndarray, float]:
    """The sample photos (and noise, which puts pixels near the clusters' borders) as the service's
    tokens `[photos, length]`, and the most its normalized pixels differ from the processor's;
    ExportError unless every token equals the image processor's `input_ids`."""
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(4)]
    tokens, worst = [], 0.0
    for photo in [*sample_photos(), *noise]:
        decoded = Decoded(photo, photo.size)
        theirs_pixels = processor(images=photo, do_color_quantize=False, return_tensors="np")["pixel_values"]
        worst = max(worst, float(np.abs(preprocess_batch([decoded], spec) - theirs_pixels).max()))
        ours = image_to_tokens(decoded, spec, cfg).ravel()
        theirs = np.asarray(processor(images=photo, return_tensors="np")["input_ids"])[0]
        if not np.array_equal(ours, theirs):
            raise ExportError(f"the service quantizes {np.sum(ours != theirs)} pixels of a photo differently "
                              f"from {type(processor).__name__}; nothing was written")  # fmt: skip
        tokens.append(ours)
    return np.stack(tokens), worst


def stepped_logits(session: ort.InferenceSession, cfg: GenerationConfig, pixels: np.ndarray) -> np.ndarray:
    """Teacher-forced logits `[batch, length, clusters]` from the step graph, one step per position."""
    feeds = dict(zip(cache_names(cfg, "past_key_values"), empty_cache(cfg, len(pixels)), strict=True))
    previous = np.full(len(pixels), cfg.levels, dtype=np.int64)
    steps = []
    for t in range(cfg.length):
        logits, *present = session.run(None, {"previous": previous, "position": np.full_like(previous, t), **feeds})
        feeds = dict(zip(feeds, present, strict=True))
        steps.append(logits)
        previous = pixels[:, t]
    return np.stack(steps, axis=1)


ATTENTION_BYTES = 2**28  # the float32 attention weights one parity run holds at most (float64: twice that)


@torch.no_grad()
def reference(model: Any, pixels: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """transformers' logits and its attention weights, a `[batch, heads, length, length]` per layer
    (not stacked, which would hold them twice)."""
    out = model(input_ids=shifted_in(torch.from_numpy(pixels), model.config.vocab_size - 1), output_attentions=True)
    return out.logits.numpy(), tuple(a.numpy() for a in out.attentions)


def attention_parity(
    models: tuple[Any, Any], session: ort.InferenceSession, pixels: np.ndarray, runs: ParityRuns
) -> tuple[np.ndarray, np.ndarray]:
    """Some images' attention graph outputs against transformers in float32 and float64, into `runs`,
    the weights a layer at a time; returns transformers' logits for them in both. The graph runs
    first: its transient room (each layer's weights, then their stack) is free again before the
    references are made."""
    logits, weights = session.run(None, {"pixels": pixels})
    (logits32, attention32), (logits64, attention64) = (reference(m, pixels) for m in models)
    runs.add_part(Compared("attention.logits", logits, logits32, logits64))
    for layer in range(weights.shape[1]):
        runs.add_part(Compared("attention.attention", weights[:, layer], attention32[layer], attention64[layer]))
    return logits32, logits64


def graph_parity(
    model: Any, cfg: GenerationConfig, sessions: dict[str, ort.InferenceSession], pixels: np.ndarray
) -> Parity:
    """Every graph's outputs against transformers in float32 and float64 (the cached steps against the
    full sequence's logits); ExportError where one is out of its tolerance. The attention graph and
    the references run on as many images at a time as ATTENTION_BYTES holds (at real size the batch's attention in
    float32 and float64 would be 20 GB), each figure the largest over all of them: the same as
    measured at once; then the main and step graphs on every image at once (the references' logits
    are small)."""
    double = copy.deepcopy(model).double()
    at_once = images_within(graphs(cfg)["attention"], ATTENTION_BYTES)
    runs = ParityRuns(["main.logits", "step.logits", "attention.logits", "attention.attention"])
    references = [attention_parity((model, double), sessions["attention"], pixels[i : i + at_once], runs)
                  for i in range(0, len(pixels), at_once)]  # fmt: skip
    del double
    logits32, logits64 = (np.concatenate([pair[k] for pair in references]) for k in (0, 1))
    main = sessions["main"].run(["logits"], {"pixels": pixels})[0]
    runs.add(Compared("main.logits", main, logits32, logits64))
    runs.add(Compared("step.logits", stepped_logits(sessions["step"], cfg, pixels), logits32, logits64))
    parity = runs.parity(len(pixels))
    require_parity(parity)
    return parity


def transformers_bits(model: Any, pixels: np.ndarray) -> np.ndarray:
    """Per image: transformers' loss over SOS + every pixel (its shift and CrossEntropyLoss), in bits."""
    start = model.config.vocab_size - 1
    with torch.no_grad():
        sequence = torch.cat([torch.full((len(pixels), 1), start), torch.from_numpy(pixels)], dim=1)
        logits = model(input_ids=sequence[:, :-1]).logits.double()
    losses = [torch.nn.functional.cross_entropy(lg, target) for lg, target in zip(logits, sequence[:, 1:], strict=True)]
    return np.array([float(loss) / math.log(2) for loss in losses])


def transformers_greedy(model: Any, cfg: GenerationConfig, prime: np.ndarray) -> np.ndarray:
    """`model.generate(do_sample=False)` from SOS + the prime's tokens `[batch, known]` -> `[batch, length]`."""
    start = torch.full((len(prime), 1), cfg.levels)
    context = torch.cat([start, torch.from_numpy(prime)], dim=1)
    with torch.no_grad():
        out = model.generate(input_ids=context, attention_mask=torch.ones_like(context), max_length=cfg.length + 1,
                             do_sample=False, pad_token_id=cfg.levels)  # fmt: skip
    return np.asarray(out[:, 1:].numpy(), dtype=np.int64)


GREEDY_TOKENS = 2048  # tokens decoded from primes: each photo's (32 for the tiny test's 8x8; 2 for a 32x32 model)


def greedy_agreement(model: Any, cfg: GenerationConfig, step: ort.InferenceSession, pixels: np.ndarray) -> float:
    """The service's sampler at top_k=1 on the step graph against transformers' greedy decoding, from
    SOS and primed with the top half of as many photos as GREEDY_TOKENS allows (at 32x32 each photo
    costs 80 s on two cores, the sampler's and generate()'s): the share of tokens equal (1.0 to publish)."""
    half, photos = cfg.height // 2, max(1, GREEDY_TOKENS // cfg.length)
    primes = [np.zeros((1, 0), dtype=np.int64), pixels[:photos, : half * cfg.width]]
    equal = total = 0
    for prime in primes:
        ours = sample(step, cfg, np.zeros(len(prime), dtype=np.int64), seed=0, top_k=1,
                      prime=prime.reshape(len(prime), -1, cfg.width)).reshape(len(prime), -1)  # fmt: skip
        theirs = transformers_greedy(model, cfg, prime)
        equal, total = equal + int((ours == theirs).sum()), total + ours.size
    return equal / total


def generation_gates(model: Any, cfg: GenerationConfig, folder: Path, specs: dict[str, GraphSpec],
                     pixels: np.ndarray) -> tuple[Parity, dict[str, float]]:  # fmt: skip
    """The graph parity, then the greedy and score gates: ExportError unless all hold. The attention
    and main graphs run without ONNX Runtime's arena, which would keep their biggest run's room (at
    real size 1.6 GB for an image's attention, 0.8 GB for the main graph's five images); the step
    graph keeps its arena, which spares it the same allocations at each of its thousand steps."""
    no_arena = ort.SessionOptions()
    no_arena.enable_cpu_mem_arena = False
    sessions = {g: ort.InferenceSession(str(folder / specs[g].file), no_arena if g != "step" else None,
                                        providers=["CPUExecutionProvider"])
                for g in ("main", "attention", "step")}  # fmt: skip
    parity = graph_parity(model, cfg, sessions, pixels[:PARITY_BATCH])
    agreement = greedy_agreement(model, cfg, sessions["step"], pixels[:PARITY_BATCH])
    if agreement < 1.0:
        raise ExportError(
            f"greedy decoding agrees with transformers' on {agreement:.2%} of tokens; nothing was written"
        )
    _, log_likelihood = sessions["main"].run(None, {"pixels": pixels})
    ours = -log_likelihood.astype(np.float64) / (cfg.length * math.log(2))
    theirs = transformers_bits(model, pixels)
    score_diff = float(np.abs(ours - theirs).max())
    if score_diff > SCORE_TOLERANCE_BITS:
        raise ExportError(f"scores differ from transformers' loss by {score_diff:.3g} bits/dim; nothing was written")
    quality = {"bits_per_dim_sample_photos": float(ours.mean()), "score_max_abs_diff_bits": score_diff,
               "greedy_token_agreement": agreement}  # fmt: skip
    return parity, quality


# the import ---------------------------------------------------------------------------------------


def import_checkpoint(folder: Path, repository: Path, name: str, version: int = 1, force: bool = False) -> Manifest:
    """Export an ImageGPT folder to `repository/name/version/` (the caller checked the target is free);
    nothing is written unless every gate passes."""
    give_back_big_blocks()  # the gates' arrays, hundreds of MB each at real size, go back to the system when freed
    model, processor = load(folder)
    config = generation_config(model, processor)
    cfg = GenerationConfig.model_validate(config)
    spec = preprocessing_of(processor, GENERATION)
    pixels, prep_error = photo_tokens(processor, spec, cfg)
    specs = graphs(cfg)
    with staging(name, version) as staged:
        export_graphs(model, cfg, staged, specs)
        parity, quality = generation_gates(model, cfg, staged, specs, pixels)
        specs[POOLED_GRAPH] = write_pooled(specs["step"], staged)  # checked against the step graph
        manifest = Manifest(
            name=name, version=version, task=GENERATION, architecture=ARCHITECTURE, graphs=specs,
            preprocessing=spec, labels=[], quality=quality, parity=parity, opset=OPSET,
            data={"source": "hugging face checkpoint", "folder": folder.resolve().name,
                  "image_processor": type(processor).__name__, "quantization": "equal to the image processor's",
                  "preprocessing_max_abs_diff": prep_error,
                  "parity_images": "scikit-learn sample photos, crops of them and noise, as tokens"},
            versions={**library_versions(), **hf_versions()}, config=config,
        )  # fmt: skip
        publish(manifest, staged, repository, force)
    return manifest
