"""Transformer layers shared by the models.

Attention is written out (not `scaled_dot_product_attention`) so that it can hand back its softmax
probabilities, which the attention-map endpoints serve; the flag costs nothing when it is off.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention; `need_weights` also returns the probabilities `[batch, heads, q, k]`."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens, dim]` -> `[batch, heads, tokens, dim // heads]`."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query `[batch, q, dim]`, key/value `[batch, k, dim]`; mask (True = hidden) broadcasts
        to `[batch, heads, q, k]`. Returns the output `[batch, q, dim]` and the probabilities."""
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = (self.dropout(probs) @ v).transpose(1, 2).flatten(2)
        return self.out(out), (probs if need_weights else None)


class MLP(nn.Sequential):
    """The transformer feed-forward block: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class PreNormBlock(nn.Module):
    """A pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT paper, eq. 2-3)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        attended, probs = self.attn(h, h, h, mask=mask, need_weights=need_weights)
        x = x + self.dropout(attended)
        x = x + self.mlp(self.norm2(x))
        return x, probs
