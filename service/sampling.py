"""Autoregressive sampling over an exported decoding-step graph with a key/value cache (numpy only).

The step graph (exported by export/image_transformer.py and export/hf_imagegpt.py) takes `previous`
`[batch]` (the token before this position, or the start token), `position` `[batch]`, `labels`
`[batch]` (a class-conditional model only) and `past_key_values.N.key` / `.value` `[batch, heads,
memory, head_dim]`, and gives `logits` `[batch, levels]` and `present.N.key` / `.value`: the names
Hugging Face Optimum uses.

Steps of concurrent requests share runs (the batcher). The cache lives either on the host, fed to
the step graph and taken back at every step, or, with the pooled step graph, on the session's device
(`CachePool`: on a GPU, no cache crosses the bus).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import numpy as np
import onnxruntime as ort

from service.manifest import GenerationConfig
from service.runtime import NUMPY_TYPES, Bound, GraphRun, Replays, bind, cuda_graph, graph_options, session_device

# the step graph's cache inputs and outputs, and the pooled step graph's (export/pooled.py)
PAST, PRESENT, POOL, UPDATED, SLOTS = "past_key_values.", "present.", "pool.", "pool_updated.", "slots"
POOLED_GRAPH = "pooled_step"


def cache_names(cfg: GenerationConfig, prefix: str) -> list[str]:
    """`past_key_values.0.key, past_key_values.0.value, ...` (or `present.`)."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(cfg.layers) for kind in ("key", "value")]


def with_labels(cfg: GenerationConfig, feeds: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """`feeds` plus the class labels where the model's graphs take them (not an unconditional model's)."""
    return {**feeds, "labels": labels} if cfg.conditional else feeds


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


# the tokens of one step (`previous`, `position`, `labels`) -> its logits; the cache is the step's own
Step = Callable[[dict[str, np.ndarray]], Awaitable[np.ndarray]]
# a graph's feeds -> its outputs (the service's batcher, or a session)
Runner = Callable[[dict[str, np.ndarray]], Awaitable[list[np.ndarray]]]


def host_steps(run: Runner, cfg: GenerationConfig, batch: int) -> Step:
    """Steps of the step graph through `run`, with the cache in host memory, fed back each step."""
    cache = {name: np.zeros((batch, *cfg.cache_shape), dtype=np.float32) for name in cache_names(cfg, PAST[:-1])}

    async def step(tokens: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal cache
        logits, *present = await run({**tokens, **cache})
        cache = dict(zip(cache, present, strict=True))
        return logits

    return step


class PooledSteps:
    """A generation's steps of the pooled graph through `run` (the batcher): its images' caches are
    the pool's rows `slots`, so only the tokens go in and the logits come out. Its slots, and `then`
    (its queue room), are given back (`release`) only once no step of theirs is running: a step left
    half-way (its client gone) still writes their rows, and must not write over a new owner's."""

    def __init__(self, run: Runner, pool: CachePool, slots: np.ndarray, then: Callable[[], None] | None) -> None:
        self.run, self.pool, self.slots, self.then = run, pool, slots, then
        self.running: asyncio.Future[list[np.ndarray]] | None = None

    async def __call__(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        self.running = asyncio.ensure_future(self.run({**tokens, SLOTS: self.slots}))
        self.running.add_done_callback(_retrieved)
        (logits,) = await asyncio.shield(self.running)  # a cancelled request leaves its step to finish
        return logits

    def release(self) -> None:
        """On the event loop: everything held back now, or when the running step ends."""
        if self.running is None or self.running.done():
            self._give_back()
        else:
            self.running.add_done_callback(lambda _: self._give_back())

    def _give_back(self) -> None:
        self.pool.release(self.slots)
        if self.then is not None:
            self.then()


def _retrieved(step: asyncio.Future[list[np.ndarray]]) -> None:
    """Marks a step's failure as seen: a step whose request left has no one else to read it."""
    if not step.cancelled():
        step.exception()


class NoFreeSlots(RuntimeError):
    """More images than the pool has free slots."""


class CachePool:
    """The key/value caches of every image being generated, kept on the session's device for the
    pooled step graph (see export/pooled.py): one pool per cache tensor, `[capacity + 1, heads,
    memory, head_dim]`, bound as both input and output of every run, so the graph updates the stepped
    rows in place. An image holds a slot from its generation's first step to its last; the graph
    resets a slot's cache at position 0, so whatever an earlier generation left there is never read.
    The last row is no one's: rows that pad a run to a CUDA graph's size write there."""

    def __init__(self, session: ort.InferenceSession, capacity: int, sizes: Sequence[int] = (1,)) -> None:
        self.session = session
        self.device = session_device(session)
        self.capacity = capacity
        self.free = list(range(capacity))
        self.lock = threading.Lock()
        self.bound: Bound = {}
        for arg in session.get_inputs():
            if arg.name.startswith(POOL):
                rows = np.zeros((capacity + 1, *arg.shape[1:]), dtype=NUMPY_TYPES[arg.type])
                pool = ort.OrtValue.ortvalue_from_numpy(rows, *self.device)
                self.bound |= {arg.name: pool, UPDATED + arg.name.removeprefix(POOL): pool}
        self.outputs = [arg.name for arg in session.get_outputs() if not arg.name.startswith(UPDATED)]
        plain = partial(self._run, options=graph_options(-1) if cuda_graph(session) else None)
        replays = Replays(session, sizes, plain, self.bound, fill={SLOTS: capacity}) if cuda_graph(session) else None
        self.replays_or_plain: GraphRun = replays or plain

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Tokens and slots -> the outputs but the pools. One run at a time updates the pools, replayed
        or not (without batching, threads could overlap)."""
        with self.lock:
            return self.replays_or_plain(feeds)

    def acquire(self, count: int) -> np.ndarray:
        """`count` free slots, held until released."""
        if count > len(self.free):
            raise NoFreeSlots(f"{count} slots asked for, {len(self.free)} free")
        slots, self.free = self.free[:count], self.free[count:]
        return np.array(slots, dtype=np.int64)

    def release(self, slots: np.ndarray) -> None:
        self.free.extend(int(s) for s in slots)

    def _run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None) -> list[np.ndarray]:
        binding = bind(self.session, feeds)
        for name in self.outputs:
            binding.bind_output(name, *self.device)
        for name, pool in self.bound.items():
            (binding.bind_ortvalue_input if name.startswith(POOL) else binding.bind_ortvalue_output)(name, pool)
        self.session.run_with_iobinding(binding, options)
        return [value.numpy() for value in binding.get_outputs()[: len(self.outputs)]]


async def sample_rows(
    step: Step,
    cfg: GenerationConfig,
    labels: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    prime: np.ndarray | None = None,
) -> AsyncIterator[tuple[int, np.ndarray]]:
    """Decode `len(labels)` images together, one `step` per pixel (through the service's batcher, so concurrent requests
    share steps; an unconditional model takes no labels, only their count). `prime` `[batch, known, width]` fixes the
    first `known` rows (image completion). Yields (row, images so far `[batch, height, width]`) after each row; the
    last yield holds the finished images."""
    batch = len(labels)
    images = np.zeros((batch, cfg.height, cfg.width), dtype=np.int64)
    known = 0 if prime is None else prime.shape[1] * cfg.width
    if prime is not None:
        images[:, : prime.shape[1]] = prime
    flat = images.reshape(batch, -1)  # a view: writing `flat` fills `images`
    previous = np.full(batch, cfg.levels, dtype=np.int64)
    for t in range(cfg.length):
        position = np.full(batch, t, dtype=np.int64)
        logits = await step(with_labels(cfg, {"previous": previous, "position": position}, labels))
        if t >= known:
            flat[:, t] = choose(logits, rng, temperature, top_k)
        previous = flat[:, t].copy()
        if (t + 1) % cfg.width == 0:
            yield t // cfg.width, images


def sample(
    session: ort.InferenceSession,
    cfg: GenerationConfig,
    labels: np.ndarray,
    seed: int,
    top_k: int | None = None,
    prime: np.ndarray | None = None,
) -> np.ndarray:
    """Finished images `[batch, height, width]` straight from a session (export checks, benchmarks)."""

    async def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, feeds))

    step = host_steps(run, cfg, len(labels))
    rows = sample_rows(step, cfg, labels, np.random.default_rng(seed), top_k=top_k, prime=prime)
    return asyncio.run(finished(rows))


async def finished(rows: AsyncIterator[tuple[int, np.ndarray]]) -> np.ndarray:
    """The images of the last row yielded: the finished batch."""
    result = np.zeros(0, dtype=np.int64)
    async for _, images in rows:
        result = images
    return result
