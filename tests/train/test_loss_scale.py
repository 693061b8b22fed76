"""fp16 dynamic loss scaling: the LossScaler on its own and through the Trainer (CPU fp16 autocast)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vlkit.config import load_config
from vlkit.train.loss_scale import LossScaler
from vlkit.train.trainer import NonFiniteLossError, Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fixed_task import FixedDataCLIPTask  # noqa: E402
from train_worker import BASE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def fp16_trainer(out: Path, *overrides: str) -> Trainer:
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={out}", "trainer.micro_batch_size=8",
                                    "trainer.precision=fp16", "trainer.logging.jsonl=false", *overrides])  # fmt: skip
    return Trainer(cfg, FixedDataCLIPTask)


def step(trainer: Trainer, batches_iter) -> dict:
    batches = trainer._micro_batches(batches_iter)[0]
    metrics = trainer.train_step(batches)
    trainer.step += 1
    return metrics


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_scale_grows_backs_off_and_round_trips_through_json():
    scaler = LossScaler(True, init_scale=8.0, growth_interval=2)
    assert scaler.scale(torch.tensor(3.0)).item() == 24.0
    scaler.update(overflow=False)
    assert scaler.get_scale() == 8.0
    scaler.update(overflow=False)  # two clean steps in a row: grow
    assert scaler.get_scale() == 16.0
    scaler.update(overflow=False)
    scaler.update(overflow=True)  # back off, and the clean-step count starts again
    assert scaler.get_scale() == 8.0
    state = json.loads(json.dumps(scaler.state_dict()))
    restored = LossScaler(True, growth_interval=2)
    restored.load_state_dict(state)
    assert restored.get_scale() == 8.0
    for s in (scaler, restored):  # the same future: one more clean step does not grow yet, two do
        s.update(overflow=False)
    assert restored.get_scale() == scaler.get_scale() == 8.0
    for s in (scaler, restored):
        s.update(overflow=False)
    assert restored.get_scale() == scaler.get_scale() == 16.0


def test_unscale_divides_the_gradients_exactly():
    scaler = LossScaler(True, init_scale=1024.0)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    scaler.scale((p * torch.tensor([0.3, 0.7])).sum()).backward()
    scaler.unscale_([p, torch.nn.Parameter(torch.ones(1))])  # a parameter without gradient is ignored
    assert torch.equal(p.grad, torch.tensor([0.3, 0.7]))


def test_disabled_scaler_is_a_no_op():
    scaler = LossScaler(False)
    loss = torch.tensor(2.0, dtype=torch.bfloat16)
    assert scaler.scale(loss) is loss
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    scaler.unscale_([p])
    scaler.update(overflow=True)
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {}


def test_fp16_training_shows_the_loss_scale_and_skips_nothing_after_warm_up(tmp_path):
    """At the default scale 2^16 this tiny CLIP's first fp16 backward overflows: the step is skipped, the scale halves
    until it fits, and from then on every step is taken."""
    trainer = fp16_trainer(tmp_path)
    batches = trainer._batches()
    history = [step(trainer, batches) for _ in range(4)]
    skipped = [m["nonfinite_steps"] for m in history]
    scales = [m["loss_scale"] for m in history]
    warm_up = skipped[-1]
    assert 1 <= warm_up < 3  # this setting overflows at 2^16; the rest of the run must be clean
    assert skipped[warm_up:] == [warm_up] * (4 - warm_up) and scales[warm_up:] == [scales[-1]] * (4 - warm_up)
    assert scales[-1] == 2.0 ** (16 - warm_up)  # one halving per skipped step
    assert all(0 < m["grad_norm"] < float("inf") for m in history[warm_up:])
    assert history[-1]["loss"] < history[warm_up]["loss"]


def test_fp32_has_no_loss_scale(tmp_path):
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "trainer.micro_batch_size=8",
                                    "trainer.logging.jsonl=false"])  # fmt: skip
    trainer = Trainer(cfg, FixedDataCLIPTask)
    metrics = step(trainer, trainer._batches())
    assert not trainer.scaler.enabled and "loss_scale" not in metrics
    assert metrics["grad_norm"] > 0  # measured without clipping too


def test_injected_overflow_is_skipped_counted_and_backs_off(tmp_path):
    # One overflow in a row would abort if it counted toward trainer.max_nonfinite_steps: an fp16 overflow above
    # scale 1 does not (the scale is still looking for its level).
    trainer = fp16_trainer(tmp_path, "trainer.max_nonfinite_steps=1")
    trainer.scaler = LossScaler(True, init_scale=2.0**10)  # low enough that nothing overflows by itself
    weight = trainer.model.text.token_embed.weight
    overflow_at = {1}
    weight.register_hook(lambda g: g * float("inf") if trainer.step in overflow_at else g)
    batches = trainer._batches()
    first = step(trainer, batches)
    assert first["nonfinite_steps"] == 0 and first["loss_scale"] == 2.0**10
    before = weights(trainer)
    second = step(trainer, batches)
    assert second["nonfinite_steps"] == 1
    assert second["loss_scale"] == 2.0**9
    assert not second["grad_norm"] < float("inf")  # inf, or nan where an inf met a zero
    for k, v in weights(trainer).items():
        assert torch.equal(v, before[k]), f"{k} changed by the skipped step"
    third = step(trainer, batches)
    assert third["nonfinite_steps"] == 1 and third["loss_scale"] == 2.0**9
    assert trainer.nonfinite_in_row == 0
    assert not torch.equal(trainer.model.text.token_embed.weight, before["text.token_embed.weight"])
    assert trainer.scaler.state_dict() == {"scale": 2.0**9, "good_steps": 1}


def test_overflow_at_scale_one_counts_toward_the_abort(tmp_path):
    trainer = fp16_trainer(tmp_path, "trainer.max_nonfinite_steps=1")
    trainer.scaler = LossScaler(True, init_scale=1.0)
    trainer.model.text.token_embed.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match="1 non-finite steps in a row"):
        step(trainer, trainer._batches())


def test_gradient_cache_scales_the_surrogate(tmp_path):
    """The cache's backward runs through the fp16 model from the surrogate: scaled and unscaled like a plain step,
    so the gradient norm matches one micro-batch of the whole batch (fp16 rounding aside)."""
    norms = []
    for overrides in (
        ["trainer.micro_batch_size=8"],
        ["trainer.micro_batch_size=4", "trainer.global_batch_size=8", "trainer.gradient_cache=true"],
    ):
        trainer = fp16_trainer(tmp_path / str(len(norms)), *overrides)
        trainer.scaler = LossScaler(True, init_scale=2.0**10)
        norms.append(step(trainer, trainer._batches())["grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-2)
