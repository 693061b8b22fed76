import math

import pytest
import torch

from vlkit.nn import RotaryEmbedding, apply_rope, rope_frequencies


def rope_by_formula(x, base=10000.0):
    """Rotate each pair (x_i, x_{i+d/2}) at position p by angle p * base^(-2i/d), one element at a time."""
    *_, t, d = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    half = d // 2
    for p in range(t):
        for i in range(half):
            theta = p * base ** (-2 * i / d)
            a, b = x[..., p, i].double(), x[..., p, i + half].double()
            out[..., p, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., p, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


def test_rope_matches_formula():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    cos, sin = RotaryEmbedding(8)(6)
    rq, rk = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(rq.double(), rope_by_formula(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk.double(), rope_by_formula(k), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = RotaryEmbedding(16)

    def score(m, n):
        cq, sq = rope(1, offset=m)
        ck, sk = rope(1, offset=n)
        return (apply_rope(q, q, cq, sq)[0] * apply_rope(k, k, ck, sk)[0]).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10), atol=1e-4, rtol=1e-4)


def test_linear_scaling_divides_frequencies():
    torch.testing.assert_close(rope_frequencies(8, scaling={"type": "linear", "factor": 4.0}), rope_frequencies(8) / 4)


def test_llama3_scaling_keeps_high_and_slows_low_frequencies():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base, scaled = rope_frequencies(128, 500000.0), rope_frequencies(128, 500000.0, scaling)
    assert scaled[0] == pytest.approx(base[0])  # shortest wavelength untouched
    assert scaled[-1] == pytest.approx(base[-1] / 8)  # longest slowed by the factor
    assert torch.all(scaled <= base + 1e-12)


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7)
