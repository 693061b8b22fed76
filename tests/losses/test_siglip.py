"""SigLIP sigmoid loss: naive and tiled against a float64 reference, and the module with its bias."""

from __future__ import annotations

import pytest
import torch
from loss_reference import grad_err, rel_err, siglip_reference, unit_features

from vlkit.losses import SigLipLoss, naive_siglip_loss, siglip_loss, tiled_siglip_loss


def _run(fn, x, y, scale, bias, dtype=torch.float32):
    xl = x.to(dtype).clone().requires_grad_()
    yl = y.to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    loss = fn(xl, yl, s, b)
    loss.backward()
    return {"loss": loss, "d_image": xl.grad, "d_text": yl.grad, "d_scale": s.grad, "d_bias": b.grad}


def _check(out, ref, tol, cancellation=100.0):
    errs = {"loss": rel_err(out["loss"], ref["loss"])}
    for key, mass in (
        ("d_image", "image_mass"),
        ("d_text", "text_mass"),
        ("d_scale", "scale_mass"),
        ("d_bias", "bias_mass"),
    ):
        assert torch.isfinite(out[key]).all()
        errs[key] = grad_err(out[key], ref[key], ref[mass], cancellation)
    assert all(v <= tol for v in errs.values()), errs


IMPLS = {
    "naive": naive_siglip_loss,
    "tiled": tiled_siglip_loss,
    "tiled_small": lambda *a: tiled_siglip_loss(*a, tile_rows=7, tile_cols=11),
    "entry": lambda *a: siglip_loss(*a, impl="auto"),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("B,D,scale,bias", [(1, 8, 10.0, -10.0), (7, 64, 10.0, -10.0), (64, 512, 100.0, 3.0)])
def test_fp32_matches_float64(impl, B, D, scale, bias):
    x, y = unit_features(B, D, seed=B + D)
    _check(_run(IMPLS[impl], x, y, scale, bias), siglip_reference(x, y, scale, bias), 1e-5)


def test_medium_batch_ragged_tiles():
    x, y = unit_features(1000, 64, seed=1)
    out = _run(lambda *a: tiled_siglip_loss(*a, tile_rows=300, tile_cols=417), x, y, 10.0, -10.0)
    _check(out, siglip_reference(x, y, 10.0, -10.0), 1e-5)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_bf16_features(impl):
    x, y = unit_features(64, 64, seed=2)
    x, y = x.bfloat16(), y.bfloat16()
    _check(_run(IMPLS[impl], x, y, 30.0, -5.0, dtype=torch.bfloat16), siglip_reference(x, y, 30.0, -5.0), 1e-2)


@pytest.mark.parametrize("kind", ["identical", "antipodal", "half_antipodal"])
def test_degenerate_features_stay_finite(kind):
    x, y = unit_features(40, 16, seed=3, kind=kind)
    out = _run(IMPLS["tiled_small"], x, y, 100.0, -10.0)
    _check(out, siglip_reference(x, y, 100.0, -10.0), 1e-4, cancellation=1.0)


def test_module_owns_the_bias():
    module = SigLipLoss()
    assert float(module.logit_bias.detach()) == -10.0
    assert [name for name, _ in module.named_parameters()] == ["logit_bias"]
    x, y = unit_features(16, 8, seed=4, dtype=torch.float32)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = module(x, y, scale)
    loss.backward()
    assert module.logit_bias.grad is not None and scale.grad is not None
    expected = naive_siglip_loss(x, y, 10.0, -10.0)
    assert abs(float(loss.detach()) - float(expected)) < 1e-5 * abs(float(expected))


def test_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        siglip_loss(x, x, 1.0, 0.0, impl="fused")
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(x, torch.randn(5, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        SigLipLoss(impl="ring2")
