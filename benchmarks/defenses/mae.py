"""A small masked autoencoder (He et al., CVPR 2022) for BDMAE's restorations, trained once per image set and cached.

The model: an image of ``C x H x W`` pixels is cut into ``patch x patch`` tokens; a ViT encoder (``depth``
pre-norm transformer blocks of width ``dim``) sees only the visible tokens; a lighter decoder
(``decoder_depth`` blocks) sees them and a learned mask token at every removed position, and predicts the
removed patches' pixels (a sigmoid: ``[0, 1]``). Any per-image mask works at test time: the visible tokens
of each image are gathered first and the rest are padding that attention ignores. Training: MSE on the
removed patches of random masks, each batch removing a share of the tokens drawn from ``mask_ratios``
(10% to 75%: BDMAE restores small regions as well as He et al.'s 75%; a model trained at 75% alone restored
10% masks worse than 75% ones here), He et al.'s loss without pixel normalisation (restorations need real
pixels), AdamW with a cosine schedule, seeded.

:func:`trained_mae` finds a finished model by the hash of its recipe (the hyperparameters, the seed, a
code version, the training images' bytes) in a cache folder, or trains it and writes it atomically
(:func:`fire_bench.atomic.write_atomically`); it is never rebuilt, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fire_adapters.datasets import user_cache_dir
from fire_bench.atomic import write_atomically
from fire_defense import FireDefenseError
from fire_defense.errors import torch_load_reason
from fire_defense.progress import progress_bar

__all__ = ["MAE", "MAERecipe", "default_mae_dir", "recipe_key", "train_mae", "trained_mae"]

MAE_VERSION = 1  # bump when a change to the code changes what a recipe trains


def default_mae_dir() -> Path:
    """``$XDG_CACHE_HOME/fire-defense/mae`` (default ``~/.cache/fire-defense/mae``)."""
    return user_cache_dir() / "mae"


@dataclass(frozen=True)
class MAERecipe:
    """What a trained MAE is a function of, besides its training images."""

    patch: int = 4
    dim: int = 64
    depth: int = 3
    decoder_dim: int = 64
    decoder_depth: int = 2
    heads: int = 4
    mask_ratios: tuple[float, float] = (0.1, 0.75)  # each batch removes a share drawn uniformly from this range
    epochs: int = 3
    batch: int = 128
    lr: float = 2e-3
    max_images: int = 20000  # a seeded subsample of a larger training set (the CPU budget)
    seed: int = 0


class _Block(nn.Module):
    """A pre-norm transformer block whose attention ignores padded keys."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if keys is None else keys[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, length, dim))
        return x + self.mlp(self.norm2(x))


class MAE(nn.Module):
    """The masked autoencoder of the module docstring, for ``channels x size x size`` images in ``[0, 1]``."""

    def __init__(self, channels: int, size: int, recipe: MAERecipe) -> None:
        super().__init__()
        if size % recipe.patch:
            raise FireDefenseError(f"bdmae: images of {size} pixels do not split into {recipe.patch}-pixel patches.")
        self.channels, self.size, self.patch = channels, size, recipe.patch
        self.grid = size // recipe.patch
        tokens, width = self.grid**2, channels * recipe.patch**2
        self.embed = nn.Linear(width, recipe.dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, recipe.dim) * 0.02)
        self.encoder = nn.ModuleList(_Block(recipe.dim, recipe.heads) for _ in range(recipe.depth))
        self.norm = nn.LayerNorm(recipe.dim)
        self.to_decoder = nn.Linear(recipe.dim, recipe.decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, recipe.decoder_dim) * 0.02)
        self.decoder_pos = nn.Parameter(torch.randn(1, tokens, recipe.decoder_dim) * 0.02)
        self.decoder = nn.ModuleList(_Block(recipe.decoder_dim, recipe.heads) for _ in range(recipe.decoder_depth))
        self.decoder_norm = nn.LayerNorm(recipe.decoder_dim)
        self.head = nn.Linear(recipe.decoder_dim, width)

    @property
    def tokens(self) -> int:
        """Patches per image (``grid * grid``)."""
        return self.grid**2

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` to ``(N, tokens, C * patch * patch)``, row-major patches."""
        n, p, g = len(x), self.patch, self.grid
        return x.reshape(n, self.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`patchify`."""
        n, p, g = len(tokens), self.patch, self.grid
        return (
            tokens.reshape(n, g, g, self.channels, p, p)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(n, self.channels, g * p, g * p)
        )

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A token mask ``(N, tokens)`` as a pixel mask ``(N, 1, H, W)`` (1: removed)."""
        g, p = self.grid, self.patch
        return mask.float().view(-1, 1, g, 1, g, 1).expand(-1, 1, g, p, g, p).reshape(-1, 1, g * p, g * p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``(N, tokens, C * patch * patch)`` of ``x`` without the tokens where ``mask`` is set."""
        mask = mask.bool()
        n, length = mask.shape
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible tokens first, in place order
        visible = int((~mask).sum(1).max())
        kept = order[:, :visible]
        valid = (~mask).gather(1, kept)
        valid |= ~valid.any(1, keepdim=True)  # nothing visible: attend to the (ignored) padding, not to nothing
        h = (self.embed(self.patchify(x)) + self.pos).gather(1, kept[..., None].expand(-1, -1, self.pos.shape[-1]))
        for block in self.encoder:
            h = block(h, valid)
        h = self.to_decoder(self.norm(h))
        full = self.mask_token.expand(n, length, -1).clone()
        keep = valid & ~mask.gather(1, kept)  # the truly visible ones land at their positions
        rows, cols = torch.nonzero(keep, as_tuple=True)
        full[rows, kept[rows, cols]] = h[rows, cols]
        full = full + self.decoder_pos
        for block in self.decoder:
            full = block(full)
        return torch.sigmoid(self.head(self.decoder_norm(full)))

    def restore(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` with its removed tokens (``mask``, ``(N, tokens)``) replaced by the MAE's prediction; one MAE pass."""
        predicted = self.unpatchify(self(x, mask)).to(x.dtype)
        pixels = self.pixel_mask(mask).to(x.dtype)
        return x * (1 - pixels) + predicted * pixels


def _random_masks(n: int, tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    removed = max(1, round(ratio * tokens))
    ranks = torch.rand(n, tokens, generator=generator).argsort(1).argsort(1)
    return ranks < removed


def _new_mae(channels: int, size: int, recipe: MAERecipe) -> MAE:
    """An untrained :class:`MAE`, initialised from ``recipe.seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return MAE(channels, size, recipe)


def train_mae(images: torch.Tensor, recipe: MAERecipe, desc: str = "bdmae: training the MAE") -> MAE:
    """A :class:`MAE` trained on ``images`` (``(N, C, H, W)`` in ``[0, 1]``) as ``recipe`` says, seeded."""
    generator = torch.Generator().manual_seed(recipe.seed)
    if len(images) > recipe.max_images:
        images = images[torch.randperm(len(images), generator=generator)[: recipe.max_images].sort().values]
    mae = _new_mae(images.shape[1], images.shape[-1], recipe)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=recipe.lr, weight_decay=0.05, betas=(0.9, 0.95))
    steps = recipe.epochs * math.ceil(len(images) / recipe.batch)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    mae.train()
    bar = progress_bar(total=steps, desc=desc, leave=False)
    with torch.enable_grad():
        for _ in range(recipe.epochs):
            for batch in torch.randperm(len(images), generator=generator).split(recipe.batch):
                x = images[batch]
                low, high = recipe.mask_ratios
                ratio = low + (high - low) * float(torch.rand((), generator=generator))
                mask = _random_masks(len(x), mae.tokens, ratio, generator)
                loss = ((mae(x, mask) - mae.patchify(x)) ** 2).mean(-1)[mask].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return mae.eval().requires_grad_(False)


def recipe_key(images: np.ndarray | torch.Tensor, recipe: MAERecipe) -> str:
    """The hash that names a trained MAE: the recipe, the code version and the training images (shape and bytes)."""
    array = np.ascontiguousarray(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    digest = hashlib.sha256(json.dumps({"version": MAE_VERSION, **asdict(recipe)}, sort_keys=True).encode())
    digest.update(f"{array.dtype.str} {array.shape};".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def trained_mae(images: np.ndarray, recipe: MAERecipe, folder: str | Path | None = None) -> tuple[MAE, Path, bool]:
    """The MAE ``recipe`` trains on uint8 ``images`` ``(N, H, W, C)``: from ``folder`` (default
    :func:`default_mae_dir`) if it was trained before, else trained now and written there atomically.

    Returns the model, its file and whether it was found in the cache.

    Raises:
        FireDefenseError: the images are not uint8 ``(N, H, W, C)`` squares, or a cached file is not this MAE.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise FireDefenseError("bdmae: the MAE's training images must be a non-empty uint8 (N, H, W, C) array.")
    if images.shape[1] != images.shape[2]:
        raise FireDefenseError(f"bdmae: the MAE takes square images, got {images.shape[1]}x{images.shape[2]}.")
    path = Path(folder if folder is not None else default_mae_dir()) / f"mae-{recipe_key(images, recipe)}.pt"
    shape = (images.shape[3], images.shape[1])
    if path.is_file():
        mae = _new_mae(*shape, recipe)
        try:
            mae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file raises many types (UnpicklingError, ...)
            raise FireDefenseError(
                f"bdmae: {path} is not this MAE ({torch_load_reason(error)}); delete it to train it again."
            ) from None
        return mae.eval().requires_grad_(False), path, True
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    mae = train_mae(x, recipe)
    write_atomically(path, lambda partial: torch.save(mae.state_dict(), partial))
    return mae, path, False
