"""Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.rope import apply_rope


def build_attn_mask(
    key_padding_mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask (True = may attend) from a [B, k_len] key-validity mask and/or causality.

    Returns None when neither applies, so SDPA can pick its fastest kernel; a pure causal mask is passed as
    ``is_causal`` instead (see :class:`Attention`), this helper only builds it when combined with padding.
    """
    if key_padding_mask is None:
        return None
    mask = key_padding_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, K]
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = mask & causal
    return mask


class Attention(nn.Module):
    """Self-attention with one fused QKV projection, optional grouped-query heads and rotary embeddings.

    Args:
        dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); None means ``num_heads``.
        bias: biases on the QKV and output projections.
        attn_dropout: dropout on attention probabilities (training only).
        proj_dropout: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} heads are not divisible by {self.num_kv_heads} key/value heads")
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: [B, T, dim]; key_padding_mask: [B, T] bool, True for real tokens; rope: (cos, sin) of [T, head_dim]."""
        b, t, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        if self.num_kv_heads != self.num_heads:
            # SDPA's enable_gqa needs torch >= 2.5 and is not supported by every backend; expanding is always right.
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = build_attn_mask(key_padding_mask, is_causal, t, t, x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        out = out.transpose(1, 2).reshape(b, t, q_size)
        return self.proj_drop(self.proj(out))
