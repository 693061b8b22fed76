"""Resuming with a changed config: hyper-parameters take effect from the resume step, other changes stop the run before
the model is built (naming the keys), and weights_only starts a new run from the checkpoint's weights."""

import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlkit.config import ConfigError, load_config
from vlkit.train.resume_config import classify_changes, plan_resume
from vlkit.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from fixed_task import FixedDataCLIPTask  # noqa: E402
from train_worker import BASE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The first run: a cosine schedule over 4 steps, stopped after 2 (SGD, lr 0.05).
FIRST = ["trainer.micro_batch_size=8", "schedule.name=cosine", "schedule.max_steps=4", "trainer.max_steps=2"]


def config(out: Path, *extra: str):
    return load_config("clip-tiny", [*BASE, f"trainer.output_dir={out}", *FIRST, *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "run"
    Trainer(config(out), FixedDataCLIPTask).fit()
    return out


@pytest.fixture
def run(first_run, tmp_path):
    """A copy of the first run to resume (resuming writes into it)."""
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: a refusal must come before it."""

    def build_model(self):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(FixedDataCLIPTask, "build_model", build_model)


def cosine(step: int, total: int = 4) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def test_a_changed_lr_takes_effect_from_the_resume_step(run, capsys):
    trainer = Trainer(config(run, "optim.lr=0.5", "optim.weight_decay=0.3", "trainer.max_steps=4",
                             "trainer.checkpoint.resume=latest", "trainer.logging.log_every_n_steps=1"),
                      FixedDataCLIPTask)  # fmt: skip
    printed = capsys.readouterr().out
    assert "optim.lr 0.05 -> 0.5" in printed and "trainer.max_steps 2 -> 4" in printed
    assert trainer.resume() and trainer.step == 2
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.3, 0.0]  # biases and norms: never
    # Where a run with lr 0.5 from the start would stand after 2 of its 4 cosine steps (not 0.05's 0.025).
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * cosine(2), rel=1e-12)
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [0.5, 0.5]
    assert trainer.scheduler.last_epoch == 2 and trainer.scheduler.get_last_lr()[0] == pytest.approx(0.25)
    history = trainer.fit()
    lrs = {h["step"]: h["lr"] for h in history if "lr" in h}
    assert lrs == {3: pytest.approx(0.5 * cosine(3)), 4: pytest.approx(0.0, abs=1e-12)}


def test_an_unchanged_config_keeps_the_restored_schedule(run):
    trainer = Trainer(config(run, "trainer.checkpoint.resume=latest"), FixedDataCLIPTask)
    scheduler = trainer.scheduler
    assert trainer.resume() and trainer.scheduler is scheduler  # nothing rebuilt: the exact resume stays exact
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * cosine(2))


@pytest.mark.usefixtures("no_model")
def test_a_changed_seed_or_width_stops_before_the_model_is_built(run):
    changes = ["trainer.seed=1", "model.vision.hidden_size=32", "optim.lr=0.5"]
    cfg = config(run, *changes, "trainer.checkpoint.resume=latest")
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, FixedDataCLIPTask)
    message = str(e.value)
    assert "model.vision.hidden_size 64 -> 32" in message and "trainer.seed 0 -> 1" in message
    assert "optim.lr" not in message  # a hyper-parameter: not a reason to stop
    assert "trainer.checkpoint.weights_only=true" in message
    assert not (run / "run.lock").exists()  # refused before the directory was claimed


@pytest.mark.usefixtures("no_model")
def test_resuming_a_missing_checkpoint_fails_early(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.checkpoint.resume=/nonexistent/ckpt: no such checkpoint directory"):
        Trainer(config(tmp_path / "new", "trainer.checkpoint.resume=/nonexistent/ckpt"), FixedDataCLIPTask)


def test_weights_only_starts_a_new_run_from_the_weights(run, tmp_path, capsys):
    checkpoint = run / "checkpoints" / "step_00000002"
    weights = load_file(str(checkpoint / "model.safetensors"))
    # A different seed and width of the logs: a new run may differ in anything but the architecture.
    cfg = config(tmp_path / "new", f"trainer.checkpoint.resume={run}", "trainer.checkpoint.weights_only=true",
                 "trainer.seed=7", "trainer.max_steps=1")  # fmt: skip
    trainer = Trainer(cfg, FixedDataCLIPTask)
    assert f"new run from the weights of {checkpoint} (step 2)" in capsys.readouterr().out
    rng = torch.get_rng_state()
    assert trainer.resume() and trainer.step == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the new run's random streams, not the checkpoint's
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert not trainer.optimizer.state and trainer.scheduler.last_epoch == 0 and trainer.loader.index == 0
    history = trainer.fit()
    assert history[0]["step"] == 1 and (tmp_path / "new" / "checkpoints" / "step_00000001").is_dir()


def test_weights_only_with_overwrite_takes_the_weights_from_the_run_it_moves_aside(run):
    cfg = config(run, "trainer.checkpoint.resume=latest", "trainer.checkpoint.weights_only=true")
    with pytest.raises(ConfigError, match="trainer.overwrite=true") as e:
        Trainer(cfg, FixedDataCLIPTask)
    assert "resume=latest" not in str(e.value)  # continuing is not what weights_only asks for
    trainer = Trainer(config(run, "trainer.checkpoint.resume=latest", "trainer.checkpoint.weights_only=true",
                             "trainer.overwrite=true"), FixedDataCLIPTask)  # fmt: skip
    (old,) = run.parent.glob("run.old-*")
    assert trainer.resume_plan.path == old / "checkpoints" / "step_00000002"
    assert trainer.resume() and trainer.step == 0


def test_classify_changes():
    cfg = load_config("clip-tiny", BASE)
    old = asdict(cfg)
    del old["trainer"]["overwrite"]  # a checkpoint from before the key existed: its default
    new = load_config("clip-tiny", [*BASE, "optim.lr=0.1", "schedule.warmup_steps=3", "trainer.output_dir=elsewhere",
                                    "trainer.logging.jsonl=false", "data.shuffle_buffer=7", "optim.layer_decay=0.7",
                                    "model.vision.activations_checkpoint_granularity=selective"])  # fmt: skip
    hyper, incompatible = classify_changes(old, new)
    assert hyper == {"optim.lr": (0.05, 0.1), "schedule.warmup_steps": (0, 3), "trainer.logging.jsonl": (True, False),
                     "model.vision.activations_checkpoint_granularity": (None, "selective")}  # fmt: skip
    # Unlisted keys are incompatible; layer decay from none to some regroups the parameters.
    assert incompatible == {"data.shuffle_buffer": (1000, 7), "optim.layer_decay": (None, 0.7)}
    old["optim"]["layer_decay"] = 0.8
    assert classify_changes(old, new)[0]["optim.layer_decay"] == (0.8, 0.7)


def test_another_world_size_cannot_continue_the_data_position(run):
    cfg = config(run, "trainer.checkpoint.resume=latest")
    assert plan_resume(cfg, 0, 1).incompatible == {}
    with pytest.raises(ConfigError, match="world size 1 -> 2"):
        plan_resume(cfg, 0, 2)  # no process group here: rank 0 decides alone
