import math

import pytest
import torch

from vlkit.nn import Attention


def reference_attention(attn: Attention, x, key_padding_mask=None, causal=False):
    """Explicit softmax(QK^T / sqrt(d)) V in float64 from the module's own weights."""
    x = x.double()
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double() if attn.qkv.bias is not None else None
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rep = h // kvh
    # Rows are grouped per key/value head: [q of the group's rep heads, k, v] for each group.
    groups = w.view(kvh, rep + 2, d, -1)
    bias = b.view(kvh, rep + 2, d)
    wq, wk, wv = groups[:, :rep].reshape(h * d, -1), groups[:, rep], groups[:, rep + 1]
    bq, bk, bv = bias[:, :rep].reshape(h * d), bias[:, rep].reshape(-1), bias[:, rep + 1].reshape(-1)
    q = torch.nn.functional.linear(x, wq, bq)
    k = torch.nn.functional.linear(x, wk.reshape(kvh * d, -1), bk)
    v = torch.nn.functional.linear(x, wv.reshape(kvh * d, -1), bv)
    bsz, t, _ = x.shape
    q = q.view(bsz, t, h, d).transpose(1, 2)
    # Query head i reads key/value head i // rep.
    k = k.view(bsz, t, kvh, d).transpose(1, 2).repeat_interleave(rep, dim=1)
    v = v.view(bsz, t, kvh, d).transpose(1, 2).repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(bsz, 1, t, t, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed &= key_padding_mask[:, None, None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, t, h * d)
    return torch.nn.functional.linear(out, attn.proj.weight.double(), attn.proj.bias.double())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_attention_matches_float64_softmax(causal, padding, kv_heads):
    torch.manual_seed(0)
    attn = Attention(32, 4, num_kv_heads=kv_heads)
    x = torch.randn(3, 7, 32)
    mask = None
    if padding:
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[0, 5:] = False
        mask[2, 3:] = False
    out = attn(x, key_padding_mask=mask, is_causal=causal)
    ref = reference_attention(attn, x, mask, causal)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-6


def test_padded_keys_do_not_influence_valid_queries():
    torch.manual_seed(1)
    attn = Attention(16, 2)
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, True, False, False]])
    y1 = attn(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16) * 100
    y2 = attn(x2, key_padding_mask=mask)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])


def test_causal_future_tokens_do_not_influence_past():
    torch.manual_seed(2)
    attn = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    x2 = x.clone()
    x2[:, 3:] += 5.0
    torch.testing.assert_close(attn(x, is_causal=True)[:, :3], attn(x2, is_causal=True)[:, :3])


def test_column_shards_of_the_fused_weight_are_whole_head_groups():
    """Running the module on a contiguous half of the QKV rows gives exactly half of the heads (tensor parallel)."""
    torch.manual_seed(3)
    attn = Attention(32, 4, num_kv_heads=2, bias=False)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.split_qkv(attn.qkv(x))
    half = attn.qkv.weight.shape[0] // 2
    q0, k0, v0 = attn.split_qkv(torch.nn.functional.linear(x, attn.qkv.weight[:half]))
    torch.testing.assert_close(q0, q[:, :2])
    torch.testing.assert_close(k0, k[:, :1])
    torch.testing.assert_close(v0, v[:, :1])


def test_bad_head_counts_raise():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="key/value heads"):
        Attention(32, 4, num_kv_heads=3)
