from __future__ import annotations

import torch

from models.vit import ViT, ViTConfig

CFG = ViTConfig(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64)


def test_shapes_and_attention_probabilities() -> None:
    model = ViT(CFG).eval()
    x = torch.randn(3, 3, 16, 16)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (3, 5)
    assert attention.shape == (3, CFG.depth, CFG.heads, 1 + CFG.grid**2, 1 + CFG.grid**2)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    torch.testing.assert_close(model(x), logits)  # the flag changes nothing else


def test_cls_token_and_positions_matter() -> None:
    """Permuting patches changes the output: the position embeddings are used."""
    model = ViT(CFG).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x), model(x.flip(-1)), atol=1e-4)
