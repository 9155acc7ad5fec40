"""Vision Transformer (Dosovitskiy et al. 2020, arXiv 2010.11929)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import PreNormBlock


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.1

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class ViT(nn.Module):
    """Patch embedding (a strided convolution), a learnable CLS token, learned position embeddings,
    pre-norm encoder blocks, a final LayerNorm and a linear head on the CLS token."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid**2 + 1, c.dim))
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(PreNormBlock(c.dim, c.heads, c.mlp_dim, c.dropout) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(
        self, pixel_values: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """pixel_values `[batch, channels, size, size]` -> logits `[batch, classes]`; with
        `return_attention` also the attention probabilities `[batch, depth, heads, 1 + grid², 1 + grid²]`
        (token 0 is CLS, then the patches in raster order)."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.dropout(torch.cat([cls, x], dim=1) + self.pos_embed)
        attentions = []
        for block in self.blocks:
            x, probs = block(x, need_weights=return_attention)
            if probs is not None:
                attentions.append(probs)
        logits = self.head(self.norm(x[:, 0]))
        if return_attention:
            return logits, torch.stack(attentions, dim=1)
        return logits
