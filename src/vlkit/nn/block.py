"""The pre-norm transformer block shared by every tower (ViT, CLIP text, LLaMA), and a stack of them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.nn.attention import Attention
from vlkit.nn.drop import DropPath
from vlkit.nn.mlp import SwiGLU, make_mlp
from vlkit.nn.norm import make_norm


class TransformerBlock(nn.Module):
    """x + DropPath(Attn(Norm(x))), then x + DropPath(MLP(Norm(x))). Configured, never copied, per model."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        num_kv_heads: int | None = None,
        activation: str = "gelu",
        normalization: str = "layernorm",
        eps: float = 1e-5,
        bias: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(normalization, dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, bias=bias, attn_dropout=attention_dropout,
                              proj_dropout=hidden_dropout)  # fmt: skip
        self.norm2 = make_norm(normalization, dim, eps)
        self.mlp = make_mlp(dim, ffn_dim, activation, bias=bias, dropout=hidden_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask, is_causal, rope, kv_cache))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of blocks with stochastic depth rising linearly to ``drop_path_rate`` over depth (as timm)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, drop_path_rate: float = 0.0, **kw):
        super().__init__()
        rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, ffn_dim, drop_path=r, **kw) for r in rates)
        self.width = dim
        # Activation checkpointing plan, set from outside (vlkit.parallel or set_grad_checkpointing): half-open block
        # ranges [start, end) recomputed as one unit in backward, and an optional selective-checkpoint context.
        self.checkpoint_ranges: list[tuple[int, int]] = []
        self.checkpoint_context_fn = None

    def init_weights(self) -> None:
        """OpenAI CLIP's initialisation: QKV ~ N(0, w^-1/2), fc1 ~ N(0, (2w)^-1/2), output projections shrunk with
        depth ~ N(0, w^-1/2 (2L)^-1/2); biases zero."""
        width, layers = self.width, len(self.blocks)
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        for block in self.blocks:
            mlp = block.mlp
            first = [mlp.gate, mlp.up] if isinstance(mlp, SwiGLU) else [mlp.fc1]
            last = mlp.down if isinstance(mlp, SwiGLU) else mlp.fc2
            stds = [(block.attn.qkv, width**-0.5), (block.attn.proj, proj_std), (last, proj_std)]
            stds += [(lin, (2 * width) ** -0.5) for lin in first]
            for lin, std in stds:
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    @property
    def grad_checkpointing(self) -> bool:
        return bool(self.checkpoint_ranges)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.checkpoint_ranges = [(i, i + 1) for i in range(len(self.blocks))] if enable else []
        self.checkpoint_context_fn = None

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_intermediates: bool = False,
        kv_cache=None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every block; with ``return_intermediates`` also return each block's output (before any final norm).

        ``kv_cache`` (a :class:`vlkit.nn.attention.KVCache` with one slot per block) makes attention extend the cached
        keys and values; recomputation is then off, since a replayed block would append to the cache twice.
        """
        states: list[torch.Tensor] = []
        recompute = self.checkpoint_ranges and self.training and torch.is_grad_enabled() and kv_cache is None
        starts = dict(self.checkpoint_ranges) if recompute else {}
        i = 0
        while i < len(self.blocks):
            end = starts.get(i, i + 1)
            if i in starts:
                kwargs = {"context_fn": self.checkpoint_context_fn} if self.checkpoint_context_fn else {}
                out = checkpoint(self._run_range, x, i, end, key_padding_mask, is_causal, rope, return_intermediates,
                                 use_reentrant=False, **kwargs)  # fmt: skip
            else:
                out = self._run_range(x, i, end, key_padding_mask, is_causal, rope, return_intermediates, kv_cache)
            x = out[-1]
            if return_intermediates:
                states.extend(out)
            i = end
        return (x, states) if return_intermediates else x

    def _run_range(self, x, start, end, key_padding_mask, is_causal, rope, keep_all, kv_cache=None) -> list:
        outs = []
        for i in range(start, end):
            x = self.blocks[i](x, key_padding_mask, is_causal, rope, kv_cache[i] if kv_cache is not None else None)
            if keep_all:
                outs.append(x)
        return outs if keep_all else [x]
