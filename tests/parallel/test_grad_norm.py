"""The global gradient norm over several device meshes (vlkit.parallel.clip_grad_norm_)."""

import math
from pathlib import Path

import pytest
import torch

from vlkit.parallel import clip_grad_norm_

WORKER = Path(__file__).with_name("grad_norm_worker.py")


def _params(seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(5, 3), (7,), (), (2, 4, 3)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        p.grad = (torch.randn(shape, generator=g) * 3).to(dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_plain_tensors_match_torch(norm_type):
    ours, theirs = _params(), _params()
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    got = clip_grad_norm_(ours, 1.0, norm_type)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert want > 1.0  # the gradients really were clipped
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0) if p.grad is not None else None
    # Measuring only leaves the gradients alone.
    before = [p.grad.clone() for p in ours if p.grad is not None]
    torch.testing.assert_close(clip_grad_norm_(ours, None, norm_type), torch.tensor(1.0), rtol=1e-5, atol=0)
    assert all(torch.equal(p.grad, b) for p, b in zip([p for p in ours if p.grad is not None], before))


def test_norm_is_fp32_for_half_gradients():
    """A bf16 gradient's norm is accumulated in fp32 (bf16 would round the sum of squares to 3 digits)."""
    params = _params(dtype=torch.bfloat16)
    want = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in params if p.grad is not None]))
    got = clip_grad_norm_(params, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradients_give_a_non_finite_norm_and_are_left_alone(bad):
    params = _params()
    params[1].grad[3] = bad
    before = [p.grad.clone() for p in params if p.grad is not None]
    for norm_type in (2.0, math.inf):
        norm = clip_grad_norm_(params, 0.5, norm_type)
        assert not torch.isfinite(norm)
        after = [p.grad for p in params if p.grad is not None]
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
                   for a, b in zip(after, before))  # fmt: skip


def test_no_gradients_give_zero():
    assert clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


def test_a_single_tensor_is_accepted():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)


# The 2 x 2 mesh on 4 ranks is covered end to end by the layout matrix (NeVA with clipping under FSDP x TP equals one
# process: tests/train/test_layout_matrix.py); here the 2-rank meshes, with every norm type.
@pytest.mark.parametrize("nproc, modes", [(2, ["fsdp", "fsdp_tp", "tp_only"])], ids=["fsdp-tp-2ranks"])
def test_parallel_layouts_equal_one_process(torchrun, nproc, modes):
    """FSDP2 on dp; FSDP x TP (2-D DTensors next to dp-only ones: torch's clip fails there); TP with plain tensors;
    and the 2 x 2 mesh: 2-, 1- and inf-norms equal the one-process norms, identical on every rank, clipping gives
    the one-process clipped gradients, and one rank's inf shard makes every rank's norm inf."""
    torchrun(WORKER, nproc, *modes)
