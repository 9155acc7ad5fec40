"""DETR (Carion et al. 2020, arXiv 2005.12872), small enough to train from scratch on a CPU.

A convolutional backbone (stride 8), a 1x1 projection to the model width, a 2-D sine positional
encoding added to queries and keys in every attention layer, a post-norm transformer encoder and
decoder, learned object queries, a class head with a "no object" class and a 3-layer box MLP
with a sigmoid giving (cx, cy, w, h) relative to the input image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models.layers import MLP, MultiHeadAttention


@dataclass
class DETRConfig:
    image_size: int = 96  # square input; other images are letterboxed into it
    in_channels: int = 1
    num_classes: int = 10  # real classes; index num_classes is "no object"
    backbone_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stride-2 stage each
    dim: int = 96
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    ffn_dim: int = 192
    num_queries: int = 10
    dropout: float = 0.0

    @property
    def stride(self) -> int:
        return 2 ** len(self.backbone_channels)

    @property
    def grid(self) -> int:
        return self.image_size // self.stride


def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's PositionEmbeddingSine (normalised): `[height * width, dim]`, half for y, half for x."""
    half = dim // 2
    y = (torch.arange(1, height + 1, dtype=torch.float32) / height * 2 * math.pi)[:, None].expand(height, width)
    x = (torch.arange(1, width + 1, dtype=torch.float32) / width * 2 * math.pi)[None, :].expand(height, width)
    freq = temperature ** (2 * (torch.arange(half) // 2) / half)

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[..., None] / freq  # [H, W, half]
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([encode(y), encode(x)], dim=-1).flatten(0, 1)


class Backbone(nn.Sequential):
    """Conv-BN-ReLU stages, each halving the resolution: `[B, C, S, S]` -> `[B, last, S/stride, S/stride]`."""

    def __init__(self, in_channels: int, channels: list[int]) -> None:
        layers: list[nn.Module] = []
        for out in channels:
            layers += [
                nn.Conv2d(in_channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            in_channels = out
        super().__init__(*layers)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk = src + pos
        attended, probs = self.attn(qk, qk, src, need_weights=need_weights)
        src = self.norm1(src + attended)
        return self.norm2(src + self.ffn(src)), probs


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.cross_attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.dim)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt)[0])
        attended, probs = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=need_weights)
        tgt = self.norm2(tgt + attended)
        return self.norm3(tgt + self.ffn(tgt)), probs


class DETR(nn.Module):
    def __init__(self, config: DETRConfig) -> None:
        super().__init__()
        self.config = c = config
        self.backbone = Backbone(c.in_channels, c.backbone_channels)
        self.input_proj = nn.Conv2d(c.backbone_channels[-1], c.dim, kernel_size=1)
        self.register_buffer("pos", sine_position_encoding(c.grid, c.grid, c.dim)[None], persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.dim)
        self.query_embed = nn.Parameter(torch.randn(1, c.num_queries, c.dim))
        self.class_head = nn.Linear(c.dim, c.num_classes + 1)
        self.box_head = nn.Sequential(
            nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, 4)
        )

    def forward(
        self, pixel_values: torch.Tensor, return_attention: bool = False, return_aux: bool = False
    ) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
        """pixel_values `[batch, channels, size, size]` ->
        `logits` `[batch, queries, classes + 1]`, `boxes` `[batch, queries, 4]` (cx, cy, w, h in [0, 1]);
        with `return_attention`, `encoder_attention` `[batch, layers, heads, grid², grid²]` and
        `decoder_attention` (cross) `[batch, layers, heads, queries, grid²]`; with `return_aux`, `aux`:
        the heads applied to every earlier decoder layer (for the auxiliary losses)."""
        memory = self.input_proj(self.backbone(pixel_values)).flatten(2).transpose(1, 2)  # [B, grid², dim]
        pos = self.pos.expand(memory.shape[0], -1, -1)
        encoder_attention = []
        for layer in self.encoder:
            memory, probs = layer(memory, pos, need_weights=return_attention)
            encoder_attention.append(probs)
        query_pos = self.query_embed.expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        per_layer, decoder_attention = [], []
        for layer in self.decoder:
            tgt, probs = layer(tgt, memory, pos, query_pos, need_weights=return_attention)
            per_layer.append(self.decoder_norm(tgt))
            decoder_attention.append(probs)
        out: dict[str, torch.Tensor | list[dict[str, torch.Tensor]]] = dict(self.predict(per_layer[-1]))
        if return_aux:
            out["aux"] = [self.predict(h) for h in per_layer[:-1]]
        if return_attention:
            out["encoder_attention"] = torch.stack(encoder_attention, dim=1)
            out["decoder_attention"] = torch.stack(decoder_attention, dim=1)
        return out

    def predict(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder states `[batch, queries, dim]` -> class logits and sigmoid boxes."""
        return {"logits": self.class_head(hidden), "boxes": self.box_head(hidden).sigmoid()}
