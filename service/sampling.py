"""Autoregressive sampling over an exported decoding-step graph with a key/value cache (numpy only).

The step graph (exported by export/image_transformer.py) takes `previous` `[batch]` (the pixel
before this position, or the start token), `position` `[]`, `labels` `[batch]` and
`past_key_values.N.key` / `.value` `[batch, heads, memory, head_dim]`, and gives `logits`
`[batch, levels]` and `present.N.key` / `.value`: the names Hugging Face Optimum uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict


class GenerationConfig(BaseModel):
    """The part of an Image Transformer's config that sampling needs (the manifest's `config`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    height: int
    width: int
    levels: int  # the start token is `levels`
    num_classes: int  # "no label" is `num_classes`
    layers: int
    heads: int
    dim: int
    memory: int

    @property
    def length(self) -> int:
        return self.height * self.width

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(heads, memory, head_dim): one cache tensor per layer and per key/value, after the batch."""
        return self.heads, self.memory, self.dim // self.heads


def cache_names(cfg: GenerationConfig, prefix: str) -> list[str]:
    """`past_key_values.0.key, past_key_values.0.value, ...` (or `present.`)."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(cfg.layers) for kind in ("key", "value")]


def choose(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None) -> np.ndarray:
    """One level per row of `logits` `[batch, levels]`: softmax at `temperature`, only the `top_k` best."""
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    draws = rng.random(len(cdf))[:, None]
    chosen: np.ndarray = np.minimum((cdf < draws).sum(-1), scaled.shape[-1] - 1).astype(np.int64)
    return chosen


StepRunner = Callable[[dict[str, np.ndarray]], Awaitable[list[np.ndarray]]]


async def sample_rows(
    run: StepRunner,
    cfg: GenerationConfig,
    labels: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    prime: np.ndarray | None = None,
) -> AsyncIterator[tuple[int, np.ndarray]]:
    """Decode `len(labels)` images together, one step-graph run per pixel (`run` is the service's
    batcher, so concurrent requests share steps). `prime` `[batch, known, width]` fixes the first
    `known` rows (image completion). Yields (row, images so far `[batch, height, width]`) after
    each row; the last yield holds the finished images."""
    batch = len(labels)
    images = np.zeros((batch, cfg.height, cfg.width), dtype=np.int64)
    known = 0 if prime is None else prime.shape[1] * cfg.width
    if prime is not None:
        images[:, : prime.shape[1]] = prime
    flat = images.reshape(batch, -1)  # a view: writing `flat` fills `images`
    cache = {
        name: np.zeros((batch, *cfg.cache_shape), dtype=np.float32) for name in cache_names(cfg, "past_key_values")
    }
    previous = np.full(batch, cfg.levels, dtype=np.int64)
    for t in range(cfg.length):
        position = np.full(batch, t, dtype=np.int64)
        logits, *present = await run({"previous": previous, "position": position, "labels": labels, **cache})
        cache = dict(zip(cache, present, strict=True))
        if t >= known:
            flat[:, t] = choose(logits, rng, temperature, top_k)
        previous = flat[:, t].copy()
        if (t + 1) % cfg.width == 0:
            yield t // cfg.width, images


def sample(session: ort.InferenceSession, cfg: GenerationConfig, labels: np.ndarray, seed: int) -> np.ndarray:
    """Finished images `[batch, height, width]` straight from a session (export checks, benchmarks)."""

    async def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    return asyncio.run(finished(sample_rows(run, cfg, labels, np.random.default_rng(seed))))


async def finished(rows: AsyncIterator[tuple[int, np.ndarray]]) -> np.ndarray:
    """The images of the last row yielded: the finished batch."""
    result = np.zeros(0, dtype=np.int64)
    async for _, images in rows:
        result = images
    return result
