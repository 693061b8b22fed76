"""Parallelism on CPU gloo ranks equals one process (each case runs parallel_worker.py under torchrun)."""

from pathlib import Path

import pytest
import torch

from vlkit.models import create_model
from vlkit.parallel.checkpointing import apply_activation_checkpointing, checkpoint_ranges

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.mark.parametrize("mode, nproc", [("ddp", 2), ("fsdp", 2), ("tp", 2), ("fsdp_tp", 4)])
def test_parallel_equals_single_process(torchrun, mode, nproc):
    torchrun(WORKER, nproc, mode)


def test_checkpoint_ranges_follow_the_document():
    assert checkpoint_ranges(6, "block", 2) == [(0, 1), (1, 2)]
    assert checkpoint_ranges(6, "block", None) == [(i, i + 1) for i in range(6)]
    assert checkpoint_ranges(5, "uniform", 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize(
    "settings",
    [
        {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "block",
         "activations_checkpoint_num_layers": 1},
        {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
         "activations_checkpoint_num_layers": 2},
        {"activations_checkpoint_granularity": "selective"},
    ],
)  # fmt: skip
def test_activation_checkpointing_variants_give_identical_gradients(settings):
    overrides = {f"vision__{k}": v for k, v in settings.items()}
    overrides["vision__num_layers"] = 3
    overrides["vision__hidden_dropout"] = 0.1  # recomputation must replay the same dropout masks
    torch.manual_seed(0)
    plain = create_model("vit-tiny", **{k: v for k, v in overrides.items() if "checkpoint" not in k})
    ckpt = create_model("vit-tiny", **overrides)
    ckpt.load_state_dict(plain.state_dict())
    applied = apply_activation_checkpointing(ckpt)
    assert applied and ckpt.backbone.transformer.checkpoint_ranges
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)
