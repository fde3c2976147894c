"""A small vision transformer (timm's ``VisionTransformer``) for 28-32 pixel images.

Patch size 4, embedding 64, depth 6, 4 heads, a class token: 7x7 = 49 patches on a 28-pixel
image (MNIST, Fashion-MNIST), 8x8 = 64 on a 32-pixel one (CIFAR, GTSRB). The zoo builds a model
from its name and class count alone (a record stores nothing else), so one model must take both
sizes: it is built for 32 pixels with timm's ``dynamic_img_size=True``, which resamples the
position embedding (bicubic, 8x8 to 7x7) to the grid of the image it is given. Any size divisible
by 4 works; its stages for FIRE are ``blocks.0`` ... ``blocks.5``. It does not learn under the
factory's default SGD recipe; the zoo gives it its own (AdamW; ``fire_adapters.models.zoo.TRAINING``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["small_vit"]


def small_vit(
    num_classes: int,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 6,
    num_heads: int = 4,
    img_size: int = 32,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """timm's ``VisionTransformer`` with these settings and ``dynamic_img_size=True``; other keywords pass through."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs.setdefault("dynamic_img_size", True)
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        **kwargs,
    )
