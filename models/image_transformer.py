"""Image Transformer (Parmar et al. 2018, arXiv 1802.05751): a decoder-only transformer over pixel
intensities in raster order, class-conditional, with local 1-D masked self-attention.

Position t predicts pixel t from the pixels before it: its input is pixel t-1 (a start token at t=0)
plus the row and column embeddings of pixel t and the class embedding. Each position attends to at
most `memory` positions: itself and the `memory - 1` before it (the paper's local 1-D attention).

Two ways to run it, which give the same logits: `forward` over whole sequences (training, scoring),
and `step`, one position at a time with a key/value cache of `memory` slots used as a ring buffer,
so a sample costs one cheap step per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import MLP


@dataclass
class ImageTransformerConfig:
    height: int = 8
    width: int = 8
    levels: int = 17  # intensity levels; the start token is index `levels`
    num_classes: int = 10  # index `num_classes` means "no label" (unconditional)
    dim: int = 64
    heads: int = 4
    layers: int = 4
    mlp_dim: int = 128
    memory: int = 24  # positions each pixel attends to, itself included: three rows back
    dropout: float = 0.1

    @property
    def length(self) -> int:
        return self.height * self.width


class LocalSelfAttention(nn.Module):
    """Masked multi-head self-attention over a local window, with a ring-buffer cache for stepping."""

    def __init__(self, cfg: ImageTransformerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [batch, heads, n, head_dim]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        out = (self.dropout(probs) @ v).transpose(1, 2).flatten(2)
        return self.out(out), probs

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[batch, n, dim]`, hidden `[n, n]` (True = masked) -> output and probabilities `[batch, heads, n, n]`."""
        return self._attend(*self._project(x), hidden)

    def step(
        self,
        x: torch.Tensor,
        write: torch.Tensor,
        hidden: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[batch, 1, dim]`; writes this position's key and value into the ring slot marked in
        `write` (`[batch, memory]`) of the cache (`[batch, heads, memory, head_dim]`) and attends over
        the slots not `hidden` (`[batch, memory]`)."""
        q, k, v = self._project(x)
        slot = write[:, None, :, None]
        key, value = torch.where(slot, k, past_key), torch.where(slot, v, past_value)
        out, probs = self._attend(q, key, value, hidden[:, None, None, :])
        return out, probs, key, value


class Block(nn.Module):
    def __init__(self, cfg: ImageTransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = LocalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.dropout)


class ImageTransformer(nn.Module):
    def __init__(self, config: ImageTransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.pixel_embed = nn.Embedding(c.levels + 1, c.dim)
        self.row_embed = nn.Embedding(c.height, c.dim)
        self.col_embed = nn.Embedding(c.width, c.dim)
        self.class_embed = nn.Embedding(c.num_classes + 1, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.levels)
        positions = torch.arange(c.length)
        self.register_buffer("rows", positions // c.width, persistent=False)
        self.register_buffer("cols", positions % c.width, persistent=False)
        offset = positions[:, None] - positions[None, :]
        self.register_buffer("local_mask", (offset < 0) | (offset >= c.memory), persistent=False)

    def embed(self, previous: torch.Tensor, position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """previous `[batch, n]` (pixel before each position, or the start token), position `[n]` or
        `[batch, n]`, labels `[batch]` -> `[batch, n, dim]`."""
        pos = self.row_embed(self.rows[position]) + self.col_embed(self.cols[position])
        return self.pixel_embed(previous) + pos + self.class_embed(labels)[:, None, :]

    def forward(
        self, pixels: torch.Tensor, labels: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """pixels `[batch, length]` (levels, raster order), labels `[batch]` -> logits `[batch, length, levels]`
        (position t predicts pixel t); with `return_attention` also `[batch, layers, heads, length, length]`."""
        start = torch.full_like(pixels[:, :1], self.config.levels)
        x = self.embed(torch.cat([start, pixels[:, :-1]], dim=1), torch.arange(pixels.shape[1]), labels)
        hidden = self.local_mask[: pixels.shape[1], : pixels.shape[1]]
        attentions = []
        for block in self.blocks:
            attended, probs = block.attn(block.norm1(x), hidden)
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            attentions.append(probs)
        logits = self.head(self.norm(x))
        return (logits, torch.stack(attentions, dim=1)) if return_attention else logits

    def step(
        self, previous: torch.Tensor, position: torch.Tensor, labels: torch.Tensor, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One position per image (images may be at different positions, so requests can share a
        step): previous `[batch]` (pixel t-1 or the start token), position `[batch]` (t), labels
        `[batch]`, cache `[key_0, value_0, key_1, ...]` each `[batch, heads, memory, head_dim]` ->
        logits `[batch, levels]` and the updated cache."""
        slots = torch.arange(self.config.memory)[None, :]
        write = slots == (position % self.config.memory)[:, None]
        hidden = slots > position[:, None]  # slots not written yet (only while t < memory)
        x = self.embed(previous[:, None], position[:, None], labels)
        present = []
        for i, block in enumerate(self.blocks):
            attended, _, key, value = block.attn.step(block.norm1(x), write, hidden, cache[2 * i], cache[2 * i + 1])
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            present += [key, value]
        return self.head(self.norm(x))[:, 0], present

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        c = self.config
        shape = (batch, c.heads, c.memory, c.dim // c.heads)
        return [torch.zeros(shape) for _ in range(2 * c.layers)]
