"""Mixup / CutMix: label arithmetic in exact numbers, the CutMix box and its λ correction (also against timm), and
the per-batch sampling rules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlkit.data.mixup import (
    MixParams,
    Mixup,
    cutmix_box,
    mix_images,
    mix_targets,
    smooth_one_hot,
    soft_target_cross_entropy,
)


def test_smoothed_one_hot_numbers():
    t = smooth_one_hot(torch.tensor([1, 3]), num_classes=4, smoothing=0.1)
    torch.testing.assert_close(t, torch.tensor([[0.025, 0.925, 0.025, 0.025], [0.025, 0.025, 0.025, 0.925]]))


def test_soft_cross_entropy_on_smoothed_targets_equals_torch_label_smoothing():
    logits, labels = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    ours = soft_target_cross_entropy(logits, smooth_one_hot(labels, 5, 0.2))
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_mixed_targets_exact():
    # Sample i is paired with sample B-1-i: 0 <-> 2, 1 with itself.
    t = mix_targets(torch.tensor([0, 1, 2]), num_classes=3, lam=0.7)
    torch.testing.assert_close(t, torch.tensor([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.3, 0.0, 0.7]]))
    # Smoothing is folded in: on = 1 - 0.1 + 0.1/3, off = 0.1/3.
    on, off = 0.9 + 0.1 / 3, 0.1 / 3
    t = mix_targets(torch.tensor([0, 1, 2]), num_classes=3, lam=0.7, smoothing=0.1)
    row0 = [0.7 * on + 0.3 * off, off, 0.7 * off + 0.3 * on]
    torch.testing.assert_close(t[0], torch.tensor(row0))
    assert row0[0] == pytest.approx(0.663333, abs=1e-6) and row0[2] == pytest.approx(0.303333, abs=1e-6)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(3))


def test_mixup_images_blend_with_the_flipped_batch():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = mix_images(x, MixParams(lam=0.25))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.25 * 0 + 0.75 * 3, 0.25 * 1 + 0.75 * 2, 1.25, 0.75]))
    assert mix_images(x, MixParams()) is x  # lam = 1, no box: untouched


@pytest.mark.parametrize(
    "lam, center, box, corrected",
    [
        (0.64, (5, 5), (2, 8, 2, 8), 0.64),  # side int(10 * 0.6) = 6, fully inside: lam unchanged
        (0.64, (0, 0), (0, 3, 0, 3), 0.91),  # clipped at the corner: 3 x 3 of the 6 x 6 remain
        (0.64, (9, 5), (6, 10, 2, 8), 0.76),  # clipped at the bottom: 4 x 6
        (0.51, (5, 5), (2, 9, 2, 9), 0.51),  # odd side int(7.0) = 7: 3 rows above the centre, 4 from it on
    ],
)
def test_cutmix_box_and_area_corrected_lambda(lam, center, box, corrected):
    got_box, got_lam = cutmix_box(lam, 10, 10, *center)
    assert got_box == box
    assert got_lam == pytest.approx(corrected)


def test_cutmix_lambda_is_each_images_own_pixel_share():
    x = torch.stack([torch.full((3, 10, 12), float(i)) for i in range(4)])
    box, lam = cutmix_box(0.5, 10, 12, 9, 1)
    out = mix_images(x, MixParams(lam=lam, box=box))
    own = (out == x).all(dim=1).float().mean(dim=(1, 2))  # share of each image's pixels that are still its own
    torch.testing.assert_close(own, torch.full((4,), lam))
    assert (out[0][(out[0] != x[0])] == 3).all()  # the rest came from the paired image


def test_cutmix_box_matches_timm():
    timm_mixup = pytest.importorskip("timm.data.mixup")
    for seed, lam, shape in [(0, 0.3, (8, 3, 32, 32)), (1, 0.8, (8, 3, 24, 40)), (2, 0.05, (8, 3, 17, 19))]:
        np.random.seed(seed)
        (yl, yh, xl, xh), timm_lam = timm_mixup.cutmix_bbox_and_lam(shape, lam, correct_lam=True)
        np.random.seed(seed)  # timm draws the centre row, then the column
        cy, cx = np.random.randint(0, shape[-2]), np.random.randint(0, shape[-1])
        box, ours = cutmix_box(lam, shape[-2], shape[-1], cy, cx)
        assert box == (yl, yh, xl, xh)
        assert ours == pytest.approx(timm_lam)
    targets = torch.tensor([3, 0, 2, 1])
    torch.testing.assert_close(
        mix_targets(targets, 5, 0.35, 0.1), timm_mixup.mixup_target(targets, 5, lam=0.35, smoothing=0.1)
    )


def test_sampling_rules():
    torch.manual_seed(0)
    assert not any(Mixup(10, 0.8, 1.0, prob=0.0).sample(32, 32).mixed for _ in range(50))
    both_cutmix = [Mixup(10, 0.8, 1.0, switch_prob=1.0).sample(32, 32) for _ in range(50)]
    assert all(p.box is not None for p in both_cutmix)
    both_mixup = [Mixup(10, 0.8, 1.0, switch_prob=0.0).sample(32, 32) for _ in range(50)]
    assert all(p.box is None and 0.0 <= p.lam <= 1.0 for p in both_mixup)
    assert all(Mixup(10, cutmix_alpha=1.0).sample(32, 32).box is not None for _ in range(20))
    # A batch is mixed with probability prob; the switch picks cutmix with switch_prob.
    draws = [Mixup(10, 0.8, 1.0, prob=0.5, switch_prob=0.25).sample(16, 16) for _ in range(2000)]
    mixed = [p for p in draws if p.mixed]
    assert len(mixed) / 2000 == pytest.approx(0.5, abs=0.04)
    assert sum(p.box is not None for p in mixed) / len(mixed) == pytest.approx(0.25, abs=0.04)
    # lam ~ Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 1/12 for a = 1.
    lams = torch.tensor([Mixup(10, mixup_alpha=1.0).sample(8, 8).lam for _ in range(3000)])
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(1 / 12, abs=0.01)


def test_call_returns_consistent_images_targets_and_params():
    torch.manual_seed(3)
    mixup = Mixup(4, cutmix_alpha=1.0, label_smoothing=0.0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    before = x.clone()
    images, targets, params = mixup(x, y)
    assert params.box is not None and not torch.equal(images, x)
    torch.testing.assert_close(images, mix_images(before, params))
    torch.testing.assert_close(targets, mix_targets(y, 4, params.lam))
    assert torch.equal(x, before)  # the input batch is not modified in place


def test_bad_arguments():
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        Mixup(10)
    with pytest.raises(ValueError, match="switch_prob"):
        Mixup(10, 1.0, switch_prob=1.5)
