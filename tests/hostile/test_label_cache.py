"""The zero-shot label cache against a flood of distinct label sets: its bound holds what it keeps,
keys included (a small model's embeddings are smaller than the labels that name them)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from service.text_tower import LabelCache


def test_a_flood_of_long_label_sets_stays_within_the_cache_bound() -> None:
    """256 labels of 200 four-byte characters key 16 KB of embeddings (a tiny model's 16 dimensions):
    counting the embeddings alone, a 4 MiB cache held about 50 MiB of keys."""
    cache = LabelCache(4 * 2**20)
    tracemalloc.start()
    try:
        for n in range(300):
            labels = tuple(f"{n} {i} " + "\U0001f600" * 190 for i in range(256))
            cache.put(("clip", 1, "fingerprint", "a photo of {}.", labels), np.zeros((256, 16), np.float32))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.held <= cache.max_bytes
    assert held < 2 * cache.max_bytes, f"{held / 2**20:.1f} MiB held by a cache of {cache.max_bytes / 2**20:.0f} MiB"


def test_a_key_is_counted_once_when_replaced() -> None:
    cache = LabelCache(2**20)
    key = ("m", 1, "f", "{}", ("a", "b"))
    for _ in range(3):
        cache.put(key, np.zeros((2, 4), np.float32))
    assert len(cache.entries) == 1
    cache.put(("other", 1, "f", "{}", ("c",)), np.zeros((1, 4), np.float32))
    cache.max_bytes = 0
    cache.put(key, np.zeros((2, 4), np.float32))
    assert cache.held == 0 and not cache.entries
