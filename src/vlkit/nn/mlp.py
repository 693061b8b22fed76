"""Feed-forward blocks: a two-layer MLP with a pointwise activation, and SwiGLU (LLaMA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP checkpoints."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu}


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} ({' | '.join(ACTIVATIONS)} | swiglu)")
        self.act = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) -> W_down. Gate and up stay separate Linear layers so tensor parallel can shard
    both column-wise and converters map Hugging Face's gate_proj / up_proj one to one."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


def make_mlp(dim: int, hidden: int, activation: str, bias: bool, dropout: float) -> nn.Module:
    if activation == "swiglu":
        return SwiGLU(dim, hidden, bias=bias, dropout=dropout)
    return Mlp(dim, hidden, activation=activation, bias=bias, dropout=dropout)
