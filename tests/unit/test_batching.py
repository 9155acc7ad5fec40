"""The dynamic batcher: merges concurrent requests, splits answers back, refuses when full."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.batching import Batcher, Overloaded
from service.errors import ServiceError
from service.manifest import BatchPolicy


class DoublingSession:
    """Stands in for an ONNX Runtime session: doubles its input, records every batch it ran."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # the batcher's run
        return self.run(None, feeds)

    def run(self, _: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            self.batches.append(len(feeds["x"]))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("broken graph")
        return [feeds["x"] * 2, feeds["x"].sum(axis=1)]


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_concurrent_requests_share_batches_and_get_their_own_answers() -> None:
    session = DoublingSession(delay=0.01)
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=8, max_queue_delay_ms=20))  # type: ignore[arg-type]

    async def scenario() -> list[list[np.ndarray]]:
        inputs = [np.full((1 + i % 3, 2), float(i)) for i in range(12)]
        return await asyncio.gather(*(batcher.run({"x": x}) for x in inputs))

    results = run(scenario())
    for i, (doubled, summed) in enumerate(results):  # type: ignore[attr-defined]
        assert doubled.shape == (1 + i % 3, 2) and (doubled == 2 * i).all()
        assert (summed == 2 * i).all()
    assert sum(session.batches) == sum(1 + i % 3 for i in range(12))
    assert len(session.batches) < 12  # merged
    assert max(session.batches) <= 8  # never over the limit


def test_a_full_queue_answers_503_with_retry_after() -> None:
    session = DoublingSession(delay=0.05)
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=3))  # type: ignore[arg-type]

    async def scenario() -> list[object]:
        return await asyncio.gather(*(batcher.run({"x": np.ones((1, 2))}) for _ in range(6)), return_exceptions=True)

    outcomes = run(scenario())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]  # type: ignore[attr-defined]
    assert refused and refused[0].status == 503 and refused[0].headers == {"Retry-After": "1"}
    assert sum(not isinstance(o, Exception) for o in outcomes) >= 3  # type: ignore[attr-defined]


def test_a_request_bigger_than_the_queue_is_413_not_a_retry() -> None:
    """300 images can never fit a queue of 256: 'retry shortly' (503) would be a lie."""
    batcher = Batcher("m", DoublingSession(), BatchPolicy(max_queue_size=4))  # type: ignore[arg-type]
    with pytest.raises(ServiceError) as info:
        run(batcher.run({"x": np.ones((5, 2))}))
    assert (info.value.status, info.value.code) == (413, "batch_too_large")
    (doubled, _) = run(batcher.run({"x": np.ones((4, 2))}))  # type: ignore[misc]
    assert doubled.shape == (4, 2)


class PickySession(DoublingSession):
    """Fails any batch holding a negative input, as a graph does on an out-of-range index."""

    def run(self, _: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if (feeds["x"] < 0).any():
            with self.lock:
                self.batches.append(len(feeds["x"]))
            raise RuntimeError("index out of range")
        return super().run(_, feeds)


def test_one_bad_request_fails_alone_not_its_batch() -> None:
    """A batch that fails is run again request by request: only the culprit gets the error."""
    session = PickySession(delay=0.02)
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=8, max_queue_delay_ms=50))  # type: ignore[arg-type]
    inputs = [np.full((1, 2), value, dtype=np.float32) for value in (1.0, 2.0, -1.0, 3.0)]

    async def scenario() -> list[object]:
        return await asyncio.gather(*(batcher.run({"x": x}) for x in inputs), return_exceptions=True)

    outcomes = run(scenario())
    assert isinstance(outcomes[2], RuntimeError)  # type: ignore[index]
    for x, outcome in zip(inputs, outcomes, strict=True):  # type: ignore[call-overload]
        if x[0, 0] > 0:
            np.testing.assert_array_equal(outcome[0], x * 2)
    assert session.batches[0] == 4 and sorted(session.batches[1:]) == [1, 1, 1, 1]


class GatedSession(DoublingSession):
    """Holds each run until the test opens the gate: the order of events, not sleeps, decides."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def run(self, _: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            self.batches.append(len(feeds["x"]))
        self.gate.wait(timeout=60)
        return [feeds["x"] * 2, feeds["x"].sum(axis=1)]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_a_client_that_left_costs_no_run() -> None:
    session = GatedSession()
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=1))  # type: ignore[arg-type]

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.run({"x": np.ones((1, 2))}))
        left = asyncio.ensure_future(batcher.run({"x": np.ones((1, 2))}))
        await until(lambda: session.batches == [1])  # the first runs; the second waits in the queue
        left.cancel()
        session.gate.set()
        await first
        await batcher.run({"x": np.ones((1, 2))})  # queued after the one that left: it ran first, or never

    run(scenario())
    assert session.batches == [1, 1] and batcher.queued_images == 0


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    session = DoublingSession(fail=True)
    batcher = Batcher("m", session, BatchPolicy())  # type: ignore[arg-type]

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="broken graph"):
            await batcher.run({"x": np.ones((1, 2))})
        session.fail = False
        (doubled, _) = await batcher.run({"x": np.ones((1, 2))})
        assert (doubled == 2).all()

    run(scenario())


def test_a_lone_short_request_runs_inline_with_the_same_stages() -> None:
    """Alone in flight and known to be short, a request skips the batcher's thread, yet reports the
    stages every request reports."""
    from service import context

    batcher = Batcher("m", DoublingSession(), BatchPolicy())  # type: ignore[arg-type]
    batcher.lone_run_s = 0.0001  # what earlier runs measured

    async def scenario() -> tuple[dict[str, float], list[np.ndarray]]:
        request, token = context.begin("r-1")
        try:
            return request.timings, await batcher.run({"x": np.ones((1, 2))})
        finally:
            context.end(token)

    timings, (doubled, _) = run(scenario())  # type: ignore[misc]
    assert batcher.task is None  # the batcher's own task never ran: inline
    assert set(timings) == {"queue", "inference"} and (doubled == 2).all()


def test_a_reservation_holds_room_for_every_step_of_a_long_run() -> None:
    """A generation reserves its room once: others meet the full queue, its own steps never do."""
    batcher = Batcher("m", DoublingSession(), BatchPolicy(max_queue_size=4))  # type: ignore[arg-type]

    async def scenario() -> None:
        reservation = batcher.reserve(3)
        with pytest.raises(Overloaded):
            batcher.reserve(2)
        with pytest.raises(Overloaded):
            await batcher.run({"x": np.ones((2, 2))})
        for _ in range(5):  # its steps run whatever else waits
            (doubled, _) = await batcher.run({"x": np.ones((3, 2))}, reservation)
            assert doubled.shape == (3, 2)
        await batcher.run({"x": np.ones((1, 2))})  # the one image of room left
        reservation.release()
        reservation.release()  # twice is harmless
        assert batcher.reserved == 0 and batcher.queued_images == 0
        await batcher.run({"x": np.ones((4, 2))})

    run(scenario())


def test_closing_fails_the_requests_it_still_holds() -> None:
    """An unload that waited its longest closes the batcher: a request running or queued then gets a
    503 at once, never a wait for ever (a stream's step has no timeout)."""
    session = GatedSession()
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=1))  # type: ignore[arg-type]

    async def scenario() -> None:
        running = asyncio.ensure_future(batcher.run({"x": np.ones((1, 2))}))
        queued = asyncio.ensure_future(batcher.run({"x": np.ones((1, 2))}))
        await until(lambda: session.batches == [1])
        await batcher.close()
        for request in (running, queued):
            with pytest.raises(ServiceError, match="unloaded"):
                await asyncio.wait_for(request, 5)
        with pytest.raises(ServiceError, match="unloaded"):
            await batcher.run({"x": np.ones((1, 2))})
        session.gate.set()

    run(scenario())
