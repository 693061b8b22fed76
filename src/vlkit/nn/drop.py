"""Regularisers that drop whole paths (stochastic depth) or whole patches (PatchDropout)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest by 1/keep."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class PatchDropout(nn.Module):
    """Keep a random subset of patch tokens during training (FLIP); the leading prefix (class) tokens always stay."""

    def __init__(self, rate: float = 0.0, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"patch dropout rate must be in [0, 1), got {rate}")
        self.rate, self.num_prefix_tokens = rate, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n, d = patches.shape
        keep = max(1, int(n * (1.0 - self.rate)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([prefix, patches], dim=1)
