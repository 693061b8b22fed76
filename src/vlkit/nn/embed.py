"""Patch embedding and learned position embeddings, with resampling of a position grid to a new image size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a strided convolution, output [B, gh*gw, dim] (row-major grid)."""

    def __init__(self, patch: int, in_channels: int, dim: int, bias: bool = False) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch}")
        return self.proj(x).flatten(2).transpose(1, 2)


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int, old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Interpolate a learned [N_prefix + gh*gw, D] position table to a new patch grid (bicubic, as timm).

    Prefix (class-token) positions are kept as they are. ``old_grid`` defaults to a square grid.
    """
    prefix, grid = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    n, dim = grid.shape
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer the grid of {n} position embeddings; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old grid {old_grid} does not hold {n} position embeddings")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    img = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    grid = img.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=0)
