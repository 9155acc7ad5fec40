"""Dynamic batching: requests for one graph queue together and run as one batch, up to
`max_batch_size` images, waiting at most `max_queue_delay_ms` for company. A full queue answers 503
with Retry-After at once instead of piling up. One batch runs at a time per graph, in a worker
thread of the model's own, so the event loop never blocks, runs never wait behind image decoding,
and the cores are not oversubscribed by parallel runs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service import context, tracing
from service.errors import ServiceError
from service.manifest import BatchPolicy
from service.runtime import GraphRun
from service.text import quoted

log = logging.getLogger("service")

# A run expected to take less than this may run on the event loop itself when its request is the only
# one in flight: no one waits for the loop then, and the two thread hops would cost more than they save.
INLINE_RUN_S = 0.001


class Overloaded(ServiceError):
    def __init__(self, model: str, limit: int) -> None:
        super().__init__(
            503, "overloaded", f"model {model!r} has {limit} images queued; retry shortly", {"Retry-After": "1"}
        )


class Unloaded(ServiceError):
    def __init__(self, model: str) -> None:
        super().__init__(503, "model_unloaded", f"model {model!r} was unloaded before this request's run; retry",
                         {"Retry-After": "1"})  # fmt: skip


@dataclass
class _Request:
    feeds: dict[str, np.ndarray]
    size: int
    future: asyncio.Future[list[np.ndarray]]
    owner: context.RequestContext | None  # the context of the request that asked: its stages are recorded there
    reserved: bool  # counted in a reservation, not in `queued_images`
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Reservation:
    """Queue room held for a run of many steps (a generation), so none of its steps can meet a full
    queue: a client hears 503 before its 200, never a stream broken off half-way."""

    batcher: Batcher
    size: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.batcher.reserved -= self.size


def _same_shapes(a: _Request, b: _Request) -> bool:
    """Requests share a run only when their inputs agree past the batch axis (images kept at their own size)."""
    return all(a.feeds[name].shape[1:] == b.feeds[name].shape[1:] for name in a.feeds)


class Batcher:
    def __init__(self, name: str, run: GraphRun, policy: BatchPolicy, executor: Executor | None = None) -> None:
        self.name = name
        self.run_graph = run  # feeds -> outputs, in the executor (a session's run, or a CachePool's)
        self.executor = executor  # where runs happen (None: asyncio's default executor)
        self.policy = policy
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.queued_images = 0  # images waiting, but for those of reservations
        self.reserved = 0  # images of reservations (see `reserve`)
        self.held: _Request | None = None  # a request that did not fit the last batch: it leads the next
        self.task: asyncio.Task[None] | None = None
        self.batch_sizes: Counter[int] = Counter()  # images per run -> runs
        self.on_run: Callable[[int], None] | None = None  # told the size of every batch run (metrics)
        self.running = False  # a batch is in the executor
        self.lone_run_s = float("inf")  # recent time of a one-image run (moving average)
        self.waiting: set[asyncio.Future[list[np.ndarray]]] = set()  # each request's answer to come
        self.closed = False

    def _admit(self, size: int) -> None:
        if size > self.policy.max_queue_size:  # it could never fit: retrying would not help
            raise ServiceError(
                413, "batch_too_large", f"{size} images in one run; the limit is {self.policy.max_queue_size}"
            )
        if self.queued_images + self.reserved + size > self.policy.max_queue_size:
            raise Overloaded(self.name, self.policy.max_queue_size)

    def reserve(self, size: int) -> Reservation:
        """Room for `size` images in the queue, held until released, for every run made with it."""
        self._admit(size)
        self.reserved += size
        return Reservation(self, size)

    async def run(self, feeds: dict[str, np.ndarray], reservation: Reservation | None = None) -> list[np.ndarray]:
        """Every output for these inputs (batch axis 0), computed as part of a shared batch."""
        if self.closed:
            raise Unloaded(self.name)
        size = len(next(iter(feeds.values())))
        reserved = reservation is not None and not reservation.released and size <= reservation.size
        if not reserved:
            self._admit(size)
        if size == 1 and self.lone_run_s < INLINE_RUN_S and self._idle() and context.in_flight() == 1:
            return self._run_inline(feeds)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher {self.name}")
        request = _Request(feeds, size, asyncio.get_running_loop().create_future(), context.current(), reserved)
        self.waiting.add(request.future)
        request.future.add_done_callback(self.waiting.discard)
        self.queued_images += 0 if reserved else size
        self.queue.put_nowait(request)
        return await request.future

    def _idle(self) -> bool:
        return not self.running and self.held is None and self.queue.empty()

    def _timed_run(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float]:
        started = time.perf_counter()
        return self.run_graph(feeds), time.perf_counter() - started

    def _run_inline(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs, seconds = self._timed_run(feeds)
        ended = time.perf_counter()
        self._ran(1, seconds)
        request = context.current()
        link = tracing.batch_run(self.name, [request], ended - seconds, ended, 1) if tracing.on else None
        context.record("queue", 0.0, request, ended - seconds)  # the same stages whichever way a request ran
        context.record("inference", seconds, request, ended, link)
        return outputs

    def _ran(self, size: int, seconds: float) -> None:
        self.batch_sizes[size] += 1
        if self.on_run is not None:
            self.on_run(size)
        if size == 1:
            self.lone_run_s = seconds if self.lone_run_s == float("inf") else 0.8 * self.lone_run_s + 0.2 * seconds

    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            self.queued_images -= sum(r.size for r in batch if not r.reserved)
            batch = [r for r in batch if not r.future.done()]  # a client that left (cancelled) costs no run
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[_Request]:
        """The next batch: the first waiting request, then whoever arrives before the delay runs out."""
        first, self.held = self.held or await self.queue.get(), None
        batch, size = [first], first.size
        deadline = time.perf_counter() + self.policy.max_queue_delay_ms / 1000
        while size < self.policy.max_batch_size:
            try:
                request = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if size + request.size > self.policy.max_batch_size or not _same_shapes(first, request):
                self.held = request
                break
            batch.append(request)
            size += request.size
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        for request in batch:
            context.record("queue", started - request.queued_at, request.owner, started)
        await self._execute(batch, started)

    async def _execute(self, batch: list[_Request], started: float) -> None:
        """One run for the batch, its outputs split back to each request."""
        try:
            feeds = (
                batch[0].feeds
                if len(batch) == 1
                else {  # a lone request runs without a copy
                    name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds
                }
            )
            self.running = True
            loop = asyncio.get_running_loop()
            outputs, seconds = await loop.run_in_executor(self.executor, self._timed_run, feeds)
        except Exception as exc:  # one failed run fails its requests, not the batcher
            if tracing.on:  # the failed run's span, marked failed
                images = sum(r.size for r in batch)
                tracing.batch_run(self.name, [r.owner for r in batch], started, time.perf_counter(), images, exc)
            if len(batch) > 1:  # one bad input must not fail its neighbours: each runs again alone
                log.warning("model %s: a batch of %d requests failed (%s); running each alone", self.name,
                            len(batch), quoted(exc, 200))  # fmt: skip
                for request in batch:
                    await self._execute([request], time.perf_counter())
                return
            log.exception("model %s: a request failed", self.name)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        finally:
            self.running = False
        ended = time.perf_counter()
        images = sum(r.size for r in batch)
        self._ran(images, seconds)
        offsets = np.cumsum([r.size for r in batch])[:-1]
        parts = [np.split(output, offsets) for output in outputs]
        link = tracing.batch_run(self.name, [r.owner for r in batch], started, ended, images) if tracing.on else None
        for i, request in enumerate(batch):
            context.record("inference", ended - started, request.owner, ended, link)
            if not request.future.done():  # a client that went away leaves a cancelled future
                request.future.set_result([part[i] for part in parts])

    async def close(self) -> None:
        """Stops the batcher. It is closed once the requests holding its model are done, or an unload
        waited its longest: those still here then (a slow client's stream) fail now, not wait for ever."""
        self.closed = True
        if self.task is not None:  # ended and dropped: a cancelled task not yet ended holds the batcher, its runs
            self.task.cancel()  # and their sessions, past the unload's collection
            await asyncio.wait([self.task])
            self.task = None
        for future in list(self.waiting):
            if not future.done():
                future.set_exception(Unloaded(self.name))
