"""Autoregressive sampling over an exported decoding-step graph with a key/value cache (numpy only).

The step graph (exported by export/image_transformer.py) takes `previous` `[batch]` (the pixel
before this position, or the start token), `position` `[]`, `labels` `[batch]` and
`past_key_values.N.key` / `.value` `[batch, heads, memory, head_dim]`, and gives `logits`
`[batch, levels]` and `present.N.key` / `.value`: the names Hugging Face Optimum uses.

The cache lives on the host between steps, so steps of concurrent requests can be concatenated into
one batch (the batcher), or, for a generation running alone, on the session's device (`DeviceCache`:
on a GPU, no cache crosses the bus).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from service import context
from service.runtime import NUMPY_TYPES, session_device


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
# the tokens of one step (`previous`, `position`, `labels`) -> its logits; the cache is the step's own
Step = Callable[[dict[str, np.ndarray]], Awaitable[np.ndarray]]

# a step expected to take less than this runs on the event loop when its request is the only one in
# flight (as the batcher does): two thread hops a step would cost more than they save
INLINE_STEP_S = 0.001


def host_steps(run: StepRunner, cfg: GenerationConfig, batch: int) -> Step:
    """Steps through `run` (the batcher) with the cache in host memory, fed back each step."""
    cache = {
        name: np.zeros((batch, *cfg.cache_shape), dtype=np.float32) for name in cache_names(cfg, "past_key_values")
    }

    async def step(tokens: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal cache
        logits, *present = await run({**tokens, **cache})
        cache = dict(zip(cache, present, strict=True))
        return logits

    return step


class DeviceCache:
    """One generation's key/value cache kept on the session's device between steps (I/O binding): each
    step's `present.*` outputs, left where they were computed, are bound as the next step's
    `past_key_values.*`; only the tokens go in and the logits come out."""

    def __init__(self, session: ort.InferenceSession, cfg: GenerationConfig, batch: int) -> None:
        self.session = session
        self.device = session_device(session)
        types = {arg.name: NUMPY_TYPES[arg.type] for arg in session.get_inputs()}
        self.past = cache_names(cfg, "past_key_values")
        zeros: list[np.ndarray] = [np.zeros((batch, *cfg.cache_shape), dtype=types[name]) for name in self.past]
        self.cache = [ort.OrtValue.ortvalue_from_numpy(z, *self.device) for z in zeros]
        self.outputs = [arg.name for arg in session.get_outputs()]  # logits, then present.* in cache order
        self.seconds = float("inf")  # the last step's run time

    def step(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        binding = self.session.io_binding()
        for name, array in tokens.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in zip(self.past, self.cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, *self.device)
        self.session.run_with_iobinding(binding)
        logits, *self.cache = binding.get_outputs()
        self.seconds = time.perf_counter() - started
        return np.asarray(logits.numpy())


def device_steps(cache: DeviceCache, executor: Executor | None) -> Step:
    """Steps over a DeviceCache on `executor`, or on the loop when they are quick and nobody waits."""

    async def step(tokens: dict[str, np.ndarray]) -> np.ndarray:
        with context.timed("inference"):
            if cache.seconds < INLINE_STEP_S and context.in_flight() <= 1:
                return cache.step(tokens)
            return await asyncio.get_running_loop().run_in_executor(executor, cache.step, tokens)

    return step


async def sample_rows(
    run: StepRunner,
    cfg: GenerationConfig,
    labels: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    prime: np.ndarray | None = None,
    steps: Step | None = None,
) -> AsyncIterator[tuple[int, np.ndarray]]:
    """Decode `len(labels)` images together, one step-graph run per pixel (`run` is the service's
    batcher, so concurrent requests share steps; `steps`, if given, runs them instead, e.g. with a
    DeviceCache). `prime` `[batch, known, width]` fixes the first `known` rows (image completion).
    Yields (row, images so far `[batch, height, width]`) after each row; the last yield holds the
    finished images."""
    batch = len(labels)
    step = steps or host_steps(run, cfg, batch)
    images = np.zeros((batch, cfg.height, cfg.width), dtype=np.int64)
    known = 0 if prime is None else prime.shape[1] * cfg.width
    if prime is not None:
        images[:, : prime.shape[1]] = prime
    flat = images.reshape(batch, -1)  # a view: writing `flat` fills `images`
    previous = np.full(batch, cfg.levels, dtype=np.int64)
    for t in range(cfg.length):
        position = np.full(batch, t, dtype=np.int64)
        logits = await step({"previous": previous, "position": position, "labels": labels})
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
