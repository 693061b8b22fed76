"""The training loop on the CPU: parallel runs equal one process, gradient cache equals the full batch,
accumulation arithmetic, NaN handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlkit.config import load_config
from vlkit.parallel import DistInfo
from vlkit.train.trainer import NonFiniteLossError, Trainer, accumulation_steps

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fixed_task import FixedDataCLIPTask  # noqa: E402
from train_worker import BASE  # noqa: E402

WORKER = HERE / "train_worker.py"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final.safetensors"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_single(out: Path, *overrides: str) -> None:
    result = subprocess.run([sys.executable, str(WORKER), str(out), "trainer.logging.log_every_n_steps=1", *overrides],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp_min(1e-12)
        assert err <= tol, f"{k}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 8 in one micro-batch."""
    out = tmp_path_factory.mktemp("single")
    run_single(out, "trainer.micro_batch_size=8")
    return out


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(torchrun, reference, tmp_path, dp):
    out = tmp_path / dp
    torchrun(WORKER, 2, str(out), "trainer.micro_batch_size=4", f"parallel.data_parallel={dp}",
             "trainer.logging.log_every_n_steps=1")  # fmt: skip
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_weights(final_weights(out), final_weights(reference))


def test_gradient_cache_equals_the_full_batch(reference, tmp_path):
    out = tmp_path / "gc"
    run_single(out, "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.gradient_cache=true")
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_weights(final_weights(out), final_weights(reference))


def test_plain_accumulation_of_a_contrastive_loss_differs(reference, tmp_path):
    """Without the cache, 4 micro-batches of 2 see 4 small contrastive problems: not the batch-8 loss."""
    out = tmp_path / "acc"
    run_single(out, "trainer.micro_batch_size=2", "trainer.global_batch_size=8")
    assert losses(out)[0] != pytest.approx(losses(reference)[0], rel=1e-3)


def test_accumulation_steps():
    cfg = load_config("clip-tiny", ["trainer.micro_batch_size=4", "trainer.global_batch_size=32"])
    assert accumulation_steps(cfg, 2) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(cfg, 3)


def test_non_finite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "trainer.micro_batch_size=4",
                                    "trainer.max_nonfinite_steps=3", "trainer.logging.jsonl=false"])  # fmt: skip
    trainer = Trainer(cfg, FixedDataCLIPTask)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = trainer.task.loss_from_features

    def nan_loss(feats):
        loss, metrics = original(feats)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer.task, "loss_from_features", nan_loss)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.fit()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a skipped step"


class _MeanSquareTask(FixedDataCLIPTask):
    """A per-sample-mean loss on the CLIP features: accumulating micro-batches must equal the full batch."""

    def loss(self, model, batch):
        out = model(batch["image"], batch["text"])
        return (out["image_features"] - out["text_features"]).pow(2).sum(-1).mean(), {}


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    weights = []
    for micro in (8, 2):
        cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path / str(micro)}", "trainer.max_steps=2",
                                        f"trainer.micro_batch_size={micro}", "trainer.global_batch_size=8",
                                        "trainer.logging.jsonl=false"])  # fmt: skip
        trainer = Trainer(cfg, _MeanSquareTask)
        trainer.fit()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert_same_weights(weights[1], weights[0])


def test_locked_image_tower_stays_frozen_and_in_eval_mode(tmp_path):
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "trainer.max_steps=2",
                                    "trainer.micro_batch_size=4", "model.lock_image=true",
                                    "model.vision.hidden_dropout=0.1", "trainer.logging.jsonl=false"])  # fmt: skip
    trainer = Trainer(cfg, FixedDataCLIPTask)
    before = {k: v.clone() for k, v in trainer.model.visual.state_dict().items()}
    text_before = trainer.model.text.token_embed.weight.clone()
    trainer.fit()
    assert all(not p.requires_grad for p in trainer.model.visual.parameters())
    assert not trainer.model.visual.training and trainer.model.text.training
    for k, v in trainer.model.visual.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(trainer.model.text.token_embed.weight, text_before)
    # Frozen parameters carry no optimizer state.
    frozen = {id(p) for p in trainer.model.visual.parameters()}
    assert not any(id(p) in frozen for g in trainer.optimizer.param_groups for p in g["params"])


def test_lit_unlocked_groups_train_the_last_blocks(tmp_path):
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "model.lock_image=true",
                                    "model.lock_image_unlocked_groups=1"])  # fmt: skip
    task = FixedDataCLIPTask(cfg, DistInfo())
    model = task.build_model()
    task.prepare_model(model)
    blocks = model.visual.transformer.blocks
    assert all(not p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert model.visual.proj.weight.requires_grad and not model.visual.patch_embed.proj.weight.requires_grad


class _RecordingCLIPTask(FixedDataCLIPTask):
    """Keeps the trainable weights after each optimizer step (after CLIP's clamp: what the average takes)."""

    def after_optimizer_step(self, model):
        super().after_optimizer_step(model)
        self.seen = getattr(self, "seen", [])
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_clip_task_gets_the_trainers_weight_average(tmp_path):
    """trainer.ema_decay is the trainer's: a CLIP run keeps, checkpoints and exports the average the decay says."""
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={tmp_path}", "trainer.micro_batch_size=8",
                                    "trainer.max_steps=3", "trainer.ema_decay=0.5"])  # fmt: skip
    trainer = Trainer(cfg, _RecordingCLIPTask)
    trainer.fit()
    w1, w2, w3 = trainer.task.seen
    # Created at step 1 as a copy; then d_n = min(0.5, (1+n)/(10+n)): 0.1 after step 2, 2/11 after step 3.
    d2, d3 = 0.1, 2 / 11
    expected = {n: d3 * (d2 * w1[n] + (1 - d2) * w2[n]) + (1 - d3) * w3[n] for n in w3}
    exported = load_file(str(tmp_path / "model_ema" / "model.safetensors"))
    model = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert trainer.ema.updates == 2
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(exported[n], model[n]) for n in expected)
    ckpt = load_file(str(tmp_path / "checkpoints" / "step_00000003" / "extra.safetensors"))
    assert any(k.startswith("state.ema.params.") for k in ckpt)


def test_ema_metric_names():
    from vlkit.train.trainer import ema_metric_name

    assert ema_metric_name("eval/classify/acc1") == "eval/classify_ema/acc1"
    assert ema_metric_name("eval/zeroshot/shapes/acc1") == "eval/zeroshot_ema/shapes/acc1"


def test_resume_reads_the_weight_average_where_earlier_versions_kept_it(tmp_path):
    """Checkpoints written before the EMA became the trainer's hold it in the task's state: resuming still takes it."""
    ema = ["trainer.micro_batch_size=8", "trainer.ema_decay=0.5"]
    whole = Trainer(load_config("clip-tiny", [*BASE, *ema, f"trainer.output_dir={tmp_path / 'whole'}",
                                              "trainer.max_steps=3"]), FixedDataCLIPTask)  # fmt: skip
    whole.fit()
    split = tmp_path / "split"
    Trainer(load_config("clip-tiny", [*BASE, *ema, f"trainer.output_dir={split}", "trainer.max_steps=2"]),
            FixedDataCLIPTask).fit()  # fmt: skip
    state_file = split / "checkpoints" / "step_00000002" / "train_state.json"
    info = json.loads(state_file.read_text())
    info["state"]["task"] = {"ema": info["state"].pop("ema")}  # the old layout (tensor references are unchanged)
    state_file.write_text(json.dumps(info))
    second = Trainer(load_config("clip-tiny", [*BASE, *ema, f"trainer.output_dir={split}", "trainer.max_steps=3",
                                               "trainer.checkpoint.resume=latest"]), FixedDataCLIPTask)  # fmt: skip
    second.fit()
    a, b = whole.ema.state_dict(), second.ema.state_dict()
    assert a["updates"] == b["updates"] == 2
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=0, atol=0)
