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

    The queries are the last ``q_len`` of the ``k_len`` positions (a KV cache holds the earlier ones). Returns None
    when no mask is needed, so SDPA can pick its fastest kernel: a pure causal mask over equal lengths is passed as
    ``is_causal`` instead (see :class:`Attention`), and a single new query may see every cached key.
    """
    if key_padding_mask is None and (not is_causal or q_len == 1 or q_len == k_len):
        return None
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len) if is_causal else None
    if key_padding_mask is None:
        return causal
    mask = key_padding_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, K]
    if causal is None:
        return mask
    mask = mask & causal
    # A query inside left padding has no valid key at all. SDPA turns such a row into NaN, and NaN values poison
    # every later query through 0 * NaN even where they are masked; let the row see its own position instead.
    keys = torch.arange(k_len, device=device)
    own = keys[None, :] == (keys[k_len - q_len :])[:, None]  # [Q, K]: each query's own position
    return mask | (own & ~mask.any(dim=-1, keepdim=True))


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for ``capacity`` positions.

    Each layer's buffers [B, KV heads, capacity, head_dim] are allocated on its first update, with the shape, dtype
    and device of the keys it receives, so the same cache serves a sharded (tensor-parallel) or a bf16 model.
    ``cache[i]`` is layer i's slot; every layer advances its own fill level, so ``length`` is that of layer 0.
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.layers = [_LayerCache(capacity) for _ in range(num_layers)]

    def __getitem__(self, i: int) -> _LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Positions already cached (the same for every row: padding is masked, not skipped)."""
        return self.layers[0].length if self.layers else 0


class _LayerCache:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, KV, T, d] and return every cached position so far (views, no copy)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot hold {end}; allocate a larger one")
        if self.k is None:
            b, kv, _, d = k.shape
            self.k = k.new_zeros(b, kv, self.capacity, d)
            self.v = v.new_zeros(b, kv, self.capacity, d)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Self-attention with one fused QKV projection, optional grouped-query heads and rotary embeddings.

    The fused weight is laid out per key/value group, as Megatron does: for each group g the rows are
    ``[q heads of g (rep * head_dim), k_g (head_dim), v_g (head_dim)]`` with rep = heads / kv_heads. Sharding those
    rows contiguously (tensor parallel, column-wise) therefore hands each rank whole groups, and the forward pass
    reads its local head count off the tensor it receives, so the same module runs sharded or not. Converters
    permute checkpoints that store ``[Q; K; V]`` (open_clip's ``in_proj``, Hugging Face's q/k/v) into this layout.

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
        self.group_size = num_heads // self.num_kv_heads  # query heads per key/value head
        self.qkv = nn.Linear(dim, (num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, groups * (rep + 2) * d] -> q [B, H, T, d], k and v [B, KV, T, d] (H, KV local to this rank)."""
        b, t, _ = qkv.shape
        rep, d = self.group_size, self.head_dim
        # One split (its backward is a single cat) rather than three slices, whose backward builds three
        # zero-filled full-size gradients and adds them.
        q, k, v = qkv.view(b, t, -1, rep + 2, d).split([rep, 1, 1], dim=3)
        q = q.reshape(b, t, -1, d).transpose(1, 2)
        k = k.squeeze(3).transpose(1, 2)
        v = v.squeeze(3).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: _LayerCache | None = None,
    ) -> torch.Tensor:
        """x: [B, T, dim]; rope: (cos, sin) of [T, head_dim] or [B, 1, T, head_dim]; kv_cache: this layer's slot of a
        :class:`KVCache`, whose earlier positions the T new queries also attend to. key_padding_mask: [B, K] bool,
        True for real tokens, over all K = cached + T key positions."""
        b, t, _ = x.shape
        q, k, v = self.split_qkv(self.qkv(x))
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if self.group_size > 1:
            # SDPA's enable_gqa needs torch >= 2.5 and is not supported by every backend; expanding is always right.
            k = k.repeat_interleave(self.group_size, dim=1)
            v = v.repeat_interleave(self.group_size, dim=1)
        mask = build_attn_mask(key_padding_mask, is_causal, t, k.shape[2], x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            # Without a mask, causality is SDPA's own (aligned top-left, right only when query and key lengths match;
            # build_attn_mask returns a mask otherwise, except for one query, which may see everything).
            is_causal=is_causal and mask is None and t > 1,
        )
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.proj_drop(self.proj(out))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int | None = None):
    """Separate q/k/v projections (weights [H*d, in] or biases [H*d]) -> the fused per-group layout of
    :class:`Attention` (for each key/value group g the rows are ``[q heads of g; k_g; v_g]``).

    Every converter (Hugging Face CLIP and LLaMA, open_clip) goes through this pair, so the layout lives in one place.
    """
    kv = num_kv_heads or num_heads
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    groups = [q.reshape(kv, (num_heads // kv) * d, *rest), k.reshape(kv, d, *rest), v.reshape(kv, d, *rest)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int | None = None):
    """The inverse of :func:`fuse_qkv`: vlkit's fused rows -> (q, k, v), each contiguous."""
    kv = num_kv_heads or num_heads
    rep = num_heads // kv
    d = qkv.shape[0] // (num_heads + 2 * kv)
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(kv, (rep + 2) * d, *rest).split([rep * d, d, d], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))
