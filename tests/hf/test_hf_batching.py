"""Images kept at their own size share a batch only with images of that size (DETR's exact policy)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from service.batching import Batcher
from service.manifest import BatchPolicy
from service.pipeline import ragged


class ShapeSession:
    """Stands in for an ONNX Runtime session: records the shape of every batch; fails on mixed sizes
    as a real graph would (np.concatenate in the batcher would already have raised)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # the batcher's run
        return self.run(None, feeds)

    def run(self, _: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            self.shapes.append(feeds["x"].shape)
        time.sleep(0.01)
        return [feeds["x"].mean(axis=(2, 3)), feeds["x"][:, :, :1, :]]


def test_only_images_of_one_size_share_a_run() -> None:
    session = ShapeSession()
    batcher = Batcher("m", session, BatchPolicy(max_batch_size=8, max_queue_delay_ms=20))  # type: ignore[arg-type]
    # runs of one size (one camera's photos) batch; a change of size starts a new batch, so sizes that
    # alternate request by request run one by one (correct, not fast)
    sizes = [(4, 6)] * 6 + [(6, 4)] * 5 + [(5, 5)] + [(4, 6), (6, 4)] * 3

    async def scenario() -> list[list[np.ndarray]]:
        return await asyncio.gather(*(batcher.run({"x": np.full((1, 1, h, w), float(i))})
                                      for i, (h, w) in enumerate(sizes)))  # fmt: skip

    results = asyncio.run(scenario())
    for i, ((_, w), (mean, row)) in enumerate(zip(sizes, results, strict=True)):
        assert mean.tolist() == [[float(i)]] and row.shape == (1, 1, 1, w)
    assert sum(shape[0] for shape in session.shapes) == len(sizes)
    assert len(session.shapes) <= 1 + 3 + 6  # (the first may run alone) the runs of 6, 5 and 1, then 6 alone
    assert {shape[2:] for shape in session.shapes} == set(sizes)


def test_ragged_outputs_stack_where_they_can() -> None:
    same = ragged([np.ones((1, 3)), np.zeros((1, 3))])
    assert same.shape == (2, 3) and same.dtype == np.float64
    mixed = ragged([np.ones((1, 2, 6)), np.zeros((1, 2, 9))])
    assert mixed.shape == (2,) and mixed[0].shape == (2, 6) and mixed[1].shape == (2, 9)
