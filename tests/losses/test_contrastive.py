"""The entry point: dispatch, validation, the nn.Module wrapper and the fused hand-off."""

from __future__ import annotations

import pytest
import torch
from loss_reference import contrastive_reference, grad_err, rel_err, unit_features

import vlkit.losses.contrastive as contrastive_mod
from vlkit.losses import IMPLS, ContrastiveLoss, contrastive_loss


def _grads(impl, x, y, scale=14.3, **kw):
    xl = x.float().clone().requires_grad_()
    yl = y.float().clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = contrastive_loss(xl, yl, s, impl=impl, **kw)
    loss.backward()
    return loss, xl.grad, yl.grad, s.grad


@pytest.mark.parametrize("impl", ["auto", "naive", "tiled", "ring"])
def test_every_cpu_impl_gives_the_reference(impl):
    x, y = unit_features(33, 16, seed=0)
    ref = contrastive_reference(x, y, 14.3)
    loss, gx, gy, gs = _grads(impl, x, y)
    assert rel_err(loss, ref["loss"]) < 1e-5
    assert rel_err(gx, ref["d_image"]) < 1e-5
    assert rel_err(gy, ref["d_text"]) < 1e-5
    assert grad_err(gs, ref["d_scale"], ref["scale_mass"]) < 1e-5


def test_auto_is_tiled_on_cpu():
    x, y = unit_features(8, 4, seed=1, dtype=torch.float32)
    loss = contrastive_loss(x.requires_grad_(), y, torch.tensor(2.0))
    assert "Tiled" in type(loss.grad_fn).__name__


def test_group_none_and_uninitialised_world_mean_single_process():
    x, y = unit_features(12, 8, seed=2, dtype=torch.float32)
    a = contrastive_loss(x, y, 5.0, group=None)
    b = contrastive_loss(x, y, 5.0, group="world")
    assert torch.equal(a, b)


def test_module_wrapper_matches_function():
    x, y = unit_features(20, 8, seed=3, dtype=torch.float32)
    labels = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    module = ContrastiveLoss(impl="tiled", local_loss=True, gather_with_grad=False)
    assert "impl='tiled'" in repr(module)
    assert not list(module.parameters())
    expected = contrastive_loss(x, y, 3.0, impl="tiled", labels=labels)
    assert torch.equal(module(x, y, 3.0, labels), expected)
    assert torch.equal(module(x, y, 3.0, labels, group=None), expected)


def test_float_scale_and_half_gradients_keep_dtype():
    x, y = unit_features(16, 8, seed=4, dtype=torch.bfloat16)
    x.requires_grad_()
    loss = contrastive_loss(x, y, 10.0)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"impl": "flash"}, "impl must be one of"),
        ({"labels": torch.arange(5)}, "labels must have shape"),
        ({"labels": torch.arange(8.0)}, "integer"),
        ({"labels": torch.arange(8) + 1}, r"labels must lie in \[0, 8\)"),
        ({"group": "everyone"}, "group must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y = unit_features(8, 4, seed=5, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        contrastive_loss(x, y, 1.0, **kwargs)


def test_bad_shapes():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="dims differ"):
        contrastive_loss(x, torch.randn(8, 5), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        contrastive_loss(x[None], x[None], 1.0)
    with pytest.raises(ValueError, match="single value"):
        contrastive_loss(x, x, torch.ones(2))
    with pytest.raises(ValueError, match="impl must be one of"):
        ContrastiveLoss(impl="nope")


def test_fused_unavailable_names_the_reason(monkeypatch):
    monkeypatch.setattr(contrastive_mod, "fused_status", lambda device: (False, "no Triton here"))
    x, y = unit_features(8, 4, seed=6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='fused' cannot run: no Triton here"):
        contrastive_loss(x, y, 1.0, impl="fused")


def test_fused_status_on_plain_cpu():
    ok, reason = contrastive_mod.fused_status(torch.device("cpu"))
    assert ok == (reason == "")


def test_fused_dispatch_passes_everything(monkeypatch):
    calls = {}

    def fake_fused(image, text, scale, labels=None):
        calls.update(image=image, text=text, scale=scale, labels=labels)
        return image.sum() * 0 + 1.5

    import vlkit.losses.fused as fused

    monkeypatch.setattr(contrastive_mod, "fused_status", lambda device: (True, ""))
    monkeypatch.setattr(fused, "fused_contrastive_loss", fake_fused)
    x, y = unit_features(6, 4, seed=7, dtype=torch.float32)
    labels = torch.tensor([1, 0, 2, 3, 5, 4])
    out = contrastive_loss(x, y, 2.0, impl="fused", labels=labels)
    assert float(out) == 1.5
    assert calls["image"] is x and calls["text"] is y and torch.equal(calls["labels"], labels)
    assert float(calls["scale"]) == 2.0


def test_impl_names_are_the_contract():
    assert set(IMPLS) == {"auto", "naive", "tiled", "fused", "ring"}
