"""Exactness of the naive and tiled contrastive losses against a float64 reference written from the definition."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import contrastive_reference, grad_err, rel_err, unit_features

import vlkit.losses.tiled as tiled_mod
from vlkit.losses import naive_contrastive_loss, tiled_contrastive_loss

FP32_TOL = 1e-5
HALF_TOL = 1e-2
# Degenerate features put every logit at exactly +-scale, so the float32 rounding of the logits and
# their LSEs (ulp(100) = 7.6e-6) is the same everywhere and does not average out, while the exact
# gradients cancel to zero. The bar there is finiteness, plus errors small against the terms' size.
DEGENERATE_TOL = 1e-4


def run(impl, x, y, scale, labels=None, dtype=torch.float32, **kw):
    xl = x.to(dtype).clone().requires_grad_()
    yl = y.to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    fn = {"naive": naive_contrastive_loss, "tiled": tiled_contrastive_loss}[impl]
    loss = fn(xl, yl, s, labels, **kw)
    loss.backward()
    assert xl.grad.dtype == dtype and yl.grad.dtype == dtype
    return {"loss": loss.detach(), "d_image": xl.grad, "d_text": yl.grad, "d_scale": s.grad}


def assert_close(out, ref, tol, cancellation=100.0):
    for key in ("loss", "d_image", "d_text", "d_scale"):
        assert torch.isfinite(out[key]).all(), f"{key} is not finite"
    errs = {"loss": rel_err(out["loss"], ref["loss"])}
    for key, mass in (("d_image", "image_mass"), ("d_text", "text_mass"), ("d_scale", "scale_mass")):
        errs[key] = grad_err(out[key], ref[key], ref[mass], cancellation)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


SMALL = [(b, d, s) for b in (1, 7, 64) for d in (8, 64, 512) for s in (1.0, 14.3, 100.0)]
MEDIUM = [(1000, 8, 100.0), (1000, 64, 1.0), (1000, 512, 14.3)]


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("B,D,scale", SMALL + MEDIUM)
def test_fp32_matches_float64(impl, B, D, scale):
    x, y = unit_features(B, D, seed=B * 1000 + D)
    assert_close(run(impl, x, y, scale), contrastive_reference(x, y, scale), FP32_TOL)


@pytest.mark.parametrize(
    "B,D,scale,tile", [(64, 64, 100.0, (5, 7)), (1000, 64, 14.3, (97, 301)), (1000, 8, 100.0, (1000, 333))]
)
def test_small_ragged_tiles(B, D, scale, tile):
    x, y = unit_features(B, D, seed=7)
    out = run("tiled", x, y, scale, tile_rows=tile[0], tile_cols=tile[1])
    assert_close(out, contrastive_reference(x, y, scale), FP32_TOL)


@functools.lru_cache(maxsize=1)
def _large_case(B, D, scale):
    # The float64 reference at B = 4097 is the expensive part; both impls share it.
    x, y = unit_features(B, D, seed=4097 + D)
    return x, y, contrastive_reference(x, y, scale)


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl,B,D,scale", [("tiled", 4097, 512, 100.0), ("naive", 4097, 8, 14.3), ("tiled", 4097, 8, 14.3)]
)
def test_fp32_matches_float64_large(impl, B, D, scale):
    x, y, ref = _large_case(B, D, scale)
    assert_close(run(impl, x, y, scale), ref, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("B,D,scale", [(7, 64, 100.0), (64, 512, 14.3), (1000, 64, 100.0)])
def test_half_features(dtype, impl, B, D, scale):
    x, y = unit_features(B, D, seed=B + D)
    x, y = x.to(dtype), y.to(dtype)
    # The reference sees the same rounded features; what remains is the implementation's error.
    assert_close(run(impl, x, y, scale, dtype=dtype), contrastive_reference(x, y, scale), HALF_TOL)


@pytest.fixture(params=["one_exp", "two_exp"])
def exp_path(request, monkeypatch):
    """Run the tiled loss through the CPU one-exponential path and through the path GPUs take."""
    if request.param == "two_exp":
        monkeypatch.setattr(tiled_mod, "_ONE_EXP_DEVICES", ())
    return request.param


@pytest.mark.parametrize("kind", ["identical", "antipodal", "half_antipodal"])
@pytest.mark.parametrize("B", [7, 300])
@pytest.mark.parametrize("variant", ["naive", "tiled", "tiled_small"])
def test_degenerate_features_stay_finite(kind, B, variant, exp_path):
    x, y = unit_features(B, 32, seed=3, kind=kind)
    kw = {"tile_rows": 3, "tile_cols": 2} if B < 10 else {"tile_rows": 64, "tile_cols": 37}
    kw = kw if variant == "tiled_small" else {}
    out = run("naive" if variant == "naive" else "tiled", x, y, 100.0, **kw)
    assert_close(out, contrastive_reference(x, y, 100.0), DEGENERATE_TOL, cancellation=1.0)


@pytest.mark.parametrize("B,D,scale,tile", [(64, 64, 100.0, (None, None)), (300, 16, 14.3, (31, 17))])
def test_two_exponential_path(B, D, scale, tile, monkeypatch):
    monkeypatch.setattr(tiled_mod, "_ONE_EXP_DEVICES", ())
    x, y = unit_features(B, D, seed=11)
    out = run("tiled", x, y, scale, tile_rows=tile[0], tile_cols=tile[1])
    assert_close(out, contrastive_reference(x, y, scale), FP32_TOL)


def test_column_far_below_tile_max_is_recomputed():
    # One text far from every image (logits -100) beside others near +100: its column sum underflows
    # in the one-exponential path and must be recomputed with its own maximum.
    x, y = unit_features(40, 16, seed=5, kind="identical")
    y = y.clone()
    y[3] = -y[3]
    out = run("tiled", x, y, 100.0, tile_rows=8)
    assert_close(out, contrastive_reference(x, y, 100.0), DEGENERATE_TOL, cancellation=1.0)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("kind", ["permutation", "duplicates"])
def test_explicit_labels(impl, kind):
    B = 200
    gen = torch.Generator().manual_seed(0)
    labels = torch.randperm(B, generator=gen) if kind == "permutation" else torch.randint(0, B, (B,), generator=gen)
    x, y = unit_features(B, 32, seed=1)
    out = (
        run(impl, x, y, 14.3, labels, tile_rows=37, tile_cols=64) if impl == "tiled" else run(impl, x, y, 14.3, labels)
    )
    assert_close(out, contrastive_reference(x, y, 14.3, labels), FP32_TOL)


def test_permutation_labels_are_two_cross_entropies():
    # For a permutation the text->image term is cross_entropy(S.T, argsort(labels)).
    B = 50
    labels = torch.randperm(B, generator=torch.Generator().manual_seed(2))
    x, y = unit_features(B, 16, seed=2)
    logits = 14.3 * x @ y.T
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, torch.argsort(labels))) / 2
    got = tiled_contrastive_loss(x, y, 14.3, labels)
    assert abs(float(got) - float(expected)) < 1e-10


def test_more_texts_than_images():
    x, _ = unit_features(30, 16, seed=3)
    _, y = unit_features(70, 16, seed=4)
    labels = torch.randint(0, 70, (30,), generator=torch.Generator().manual_seed(3))
    ref = contrastive_reference(x, y, 14.3, labels)
    assert_close(run("tiled", x, y, 14.3, labels, tile_rows=7, tile_cols=20), ref, FP32_TOL)
    assert_close(run("naive", x, y, 14.3, labels), ref, FP32_TOL)
    with pytest.raises(ValueError, match="default labels"):
        tiled_contrastive_loss(x, y, 14.3)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_one_direction(weights):
    B = 90
    x, y = unit_features(B, 16, seed=6)
    logits = 30.0 * x @ y.T
    labels = torch.arange(B)
    expected = F.cross_entropy(logits if weights[0] else logits.T, labels)
    kw = {"row_weight": weights[0] / B, "col_weight": weights[1] / B}
    for fn in (naive_contrastive_loss, tiled_contrastive_loss):
        got = fn(x.float(), y.float(), 30.0, **kw)
        assert abs(float(got) - float(expected)) / float(expected) < FP32_TOL


def test_ignored_rows_match_naive():
    # Negative labels drop a row's positive pair (used by the distributed local loss).
    B = 60
    x, y = unit_features(B, 16, seed=8)
    labels = torch.arange(B)
    labels[::3] = -1
    kw = {"row_weight": 0.01, "col_weight": 0.02}
    ref = naive_contrastive_loss(x.clone().requires_grad_(), y, 14.3, labels, **kw)
    xl = x.float().requires_grad_()
    got = tiled_contrastive_loss(xl, y.float(), 14.3, labels, tile_rows=7, tile_cols=11, **kw)
    assert rel_err(got, ref) < FP32_TOL
    xr = x.clone().requires_grad_()
    naive_contrastive_loss(xr, y, 14.3, labels, **kw).backward()
    got.backward()
    assert rel_err(xl.grad, xr.grad) < FP32_TOL


def test_saves_no_quadratic_tensors():
    # The backward recomputes tiles: nothing of size B x B may be kept between forward and backward.
    B, D = 512, 32
    x, y = unit_features(B, D, seed=9, dtype=torch.float32)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tiled_contrastive_loss(x, y, torch.tensor(10.0, requires_grad=True))
    loss.backward()
    assert saved and max(saved) <= B * D


def test_autocast_does_not_lower_precision():
    x, y = unit_features(64, 32, seed=10)
    ref = contrastive_reference(x, y, 50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run("tiled", x, y, 50.0)
    assert_close(out, ref, FP32_TOL)


def test_tile_shape_prefers_full_rows():
    cpu = torch.device("cpu")
    tr, tc = tiled_mod.tile_shape(8192, 8192, cpu)
    assert tc == 8192 and tr * tc <= tiled_mod._TILE_ELEMENTS["cpu"]
    tr, tc = tiled_mod.tile_shape(1 << 20, 1 << 20, cpu)
    assert tr >= tiled_mod._MIN_TILE_ROWS and tc < 1 << 20
    assert tiled_mod.tile_shape(5, 3, cpu) == (5, 3)
    assert tiled_mod.tile_shape(5, 3, cpu, 2, 2) == (2, 2)


@settings(max_examples=25, deadline=None, database=None)
@given(
    n=st.integers(1, 40),
    extra_cols=st.integers(0, 10),
    d=st.integers(1, 24),
    log_scale=st.floats(math.log(0.01), math.log(100.0)),
    tile_rows=st.integers(3, 48),
    tile_cols=st.integers(3, 48),
    use_labels=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_tiled_equals_reference(n, extra_cols, d, log_scale, tile_rows, tile_cols, use_labels, seed):
    m = n + extra_cols if use_labels else n
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.randint(0, m, (n,), generator=gen) if use_labels else None
    scale = math.exp(log_scale)
    out = run("tiled", x, y, scale, labels, tile_rows=tile_rows, tile_cols=tile_cols)
    # Arbitrary shapes include total cancellations (d = 1, a text paired with the only image), so the
    # gradients are held to 1e-5 of the size of their terms: backward stability, not relative accuracy.
    assert_close(out, contrastive_reference(x, y, scale, labels), FP32_TOL, cancellation=1.0)
