import pytest
import torch

from vlkit.nn import DropPath, PatchDropout, PatchEmbed, resample_pos_embed
from vlkit.nn.mlp import Mlp, SwiGLU, make_mlp, quick_gelu
from vlkit.nn.norm import LayerNorm, RMSNorm


def test_patch_embed_non_square():
    pe = PatchEmbed(8, 3, 16)
    assert pe(torch.randn(2, 3, 32, 48)).shape == (2, 4 * 6, 16)
    with pytest.raises(ValueError, match="not divisible"):
        pe(torch.randn(1, 3, 30, 32))


def test_resample_same_grid_is_identity():
    pos = torch.randn(1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), 1) is pos


def test_resample_keeps_prefix_and_a_constant_field():
    pos = torch.cat([torch.randn(2, 4), torch.full((9, 4), 3.0)])
    out = resample_pos_embed(pos, (5, 7), num_prefix_tokens=2, old_grid=(3, 3))
    assert out.shape == (2 + 35, 4)
    torch.testing.assert_close(out[:2], pos[:2])
    torch.testing.assert_close(out[2:], torch.full((35, 4), 3.0))


def test_resample_rejects_wrong_grid():
    with pytest.raises(ValueError, match="does not hold"):
        resample_pos_embed(torch.randn(10, 4), (4, 4), 1, old_grid=(4, 4))


def test_drop_path_identity_in_eval_and_unbiased_in_train():
    torch.manual_seed(0)
    dp = DropPath(0.3)
    x = torch.ones(20000, 1)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))
    assert y.mean().item() == pytest.approx(1.0, abs=0.03)


def test_patch_dropout_keeps_prefix_tokens():
    torch.manual_seed(0)
    pd = PatchDropout(0.5, num_prefix_tokens=2)
    x = torch.arange(2 * 10, dtype=torch.float32).view(1, 10, 2).repeat(3, 1, 1)
    pd.train()
    y = pd(x)
    assert y.shape == (3, 2 + 4, 2)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    pd.eval()
    assert torch.equal(pd(x), x)


def test_activations_and_norms():
    x = torch.randn(4, 8)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert isinstance(make_mlp(8, 16, "swiglu", False, 0.0), SwiGLU)
    assert isinstance(make_mlp(8, 16, "quick_gelu", True, 0.0), Mlp)
    with pytest.raises(ValueError, match="unknown activation"):
        Mlp(8, 16, activation="gleu")
    rms = RMSNorm(8)
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(rms(x), ref)
    ln = LayerNorm(8)
    assert ln(x.bfloat16()).dtype == torch.bfloat16
