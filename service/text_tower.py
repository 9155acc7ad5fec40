"""A zero-shot model's text side, without transformers: labels into the text graph's inputs through the
checkpoint's own tokenizer (the `tokenizers` library, set up as the manifest's `text` says), the
scores of images against label embeddings as transformers' zero-shot pipeline computes them, and a
bounded cache of label embeddings. Shared by the zero-shot task and the importer's checks."""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.manifest import ScoreActivation, TextTower


class TextEncoder:
    """Texts -> `input_ids` (and `attention_mask`), int64 `[texts, tokens]`, padded and truncated as the
    zero-shot pipeline has transformers' tokenizer do it."""

    def __init__(self, path: Path, tower: TextTower) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(tower.max_length)
        length = tower.max_length if tower.padding == "max_length" else None
        self.tokenizer.enable_padding(pad_id=tower.pad_id, length=length)

    def tokenize(self, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs `names` (input_ids, attention_mask) for `texts`."""
        found = self.tokenizer.encode_batch(texts)
        arrays = {
            "input_ids": np.array([e.ids for e in found], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in found], dtype=np.int64),
        }
        return {name: arrays[name] for name in names}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row cosine similarity of `[n, d]` arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dot = (a64 * b64).sum(-1)
    result: np.ndarray = dot / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))
    return result


def unit(vectors: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    return scaled


def label_scores(images: np.ndarray, texts: np.ndarray, tower: TextTower, activation: ScoreActivation) -> np.ndarray:
    """`[images, d]`, `[labels, d]` -> `[images, labels]`: logit_scale times the cosine (plus SigLIP's
    bias), then a softmax over the labels (CLIP) or a sigmoid for each (SigLIP)."""
    logits = tower.logit_scale * unit(images.astype(np.float64)) @ unit(texts.astype(np.float64)).T + tower.logit_bias
    if activation == "sigmoid":
        sigmoid: np.ndarray = 1 / (1 + np.exp(-logits))
        return sigmoid
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    softmax: np.ndarray = shifted / shifted.sum(-1, keepdims=True)
    return softmax


def _untold(hit: bool) -> None:
    """Nothing: lookups before the app wires its metrics."""


class LabelCache:
    """The text embeddings of label sets, most recently used first, within `max_bytes`; each lookup told
    to `on_lookup` (True: a hit), which the app wires to its metrics."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.held = 0  # bytes
        self.on_lookup: Callable[[bool], None] = _untold

    def get(self, key: Hashable) -> np.ndarray | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        self.on_lookup(found is not None)
        return found

    def put(self, key: Hashable, embeddings: np.ndarray) -> None:
        if key in self.entries:
            self.held -= footprint(key, self.entries.pop(key))
        self.entries[key] = embeddings
        self.held += footprint(key, embeddings)
        while self.held > self.max_bytes and self.entries:
            self.held -= footprint(*self.entries.popitem(last=False))


def footprint(key: Hashable, embeddings: np.ndarray) -> int:
    """The bytes an entry holds: its embeddings and its key (a small model's embeddings can take less
    than the labels that name them: 256 labels of 200 emoji are 200 KB; 16 dimensions of them, 16 KB)."""
    parts = list(key) if isinstance(key, tuple) else [key]
    for part in [p for p in parts if isinstance(p, tuple)]:
        parts += part
    return embeddings.nbytes + sys.getsizeof(key) + sum(map(sys.getsizeof, parts))


LABEL_CACHE = LabelCache(64 * 2**20)  # the process's; the app sets its size and wires its metrics
