"""What ``vlkit train`` tells its user: where the run writes, on what and with how many parameters, how it ended,
that a finished run is finished, a warm-up longer than the run, and plain log lines instead of a bar off a terminal."""

import sys
from pathlib import Path

import pytest
import torch

from vlkit.config import load_config
from vlkit.train import trainer as trainer_module
from vlkit.train.trainer import Trainer
from vlkit.utils.flops import count_parameters

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fixed_task import FixedDataCLIPTask  # noqa: E402
from train_worker import BASE  # noqa: E402


def make(out: Path, *overrides: str) -> Trainer:
    cfg = load_config("clip-tiny", [*BASE, f"trainer.output_dir={out}", "trainer.max_steps=4",
                                    "trainer.micro_batch_size=8", "trainer.logging.log_every_n_steps=2",
                                    "trainer.val_check_interval=0", *overrides])  # fmt: skip
    return Trainer(cfg, FixedDataCLIPTask)


def test_start_and_end_say_where_what_and_how_long(tmp_path, capsys):
    trainer = make(tmp_path / "run")
    params = count_parameters(trainer.model)
    trainer.fit()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"run directory: {tmp_path / 'run'} (config.yaml; metrics: metrics.jsonl;" in lines[0]
    assert f"checkpoints: {tmp_path / 'run' / 'checkpoints'})" in lines[0]
    assert lines[1].startswith("devices: 1 x cpu | layout: data parallel none x 1, tensor parallel 1, precision fp32")
    assert lines[2].startswith(f"parameters: {params:,} total, {params:,} trainable | steps 0 -> 4, global batch 8")
    # Off a terminal (pytest captures): one plain line per log interval, no progress bar's carriage returns.
    assert "\r" not in out
    assert [line.split(" | ")[0] for line in lines if line.startswith("step ")] == ["step 2/4", "step 4/4"]
    assert any(line.startswith("finished clip-tiny: step 4/4 in 0m ") for line in lines)
    assert any(line.startswith("final metrics: step 4/4 | loss ") for line in lines)
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step_00000004'}" in lines
    assert lines[-1].startswith(f"model: {tmp_path / 'run' / 'model'} ")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    make(tmp_path / "run").fit()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    history = make(tmp_path / "run", "trainer.checkpoint.resume=latest").fit()
    out = capsys.readouterr().out
    assert history == []
    assert "the run is finished (step 4 >= trainer.max_steps=4); nothing to train" in out
    assert f"model: {tmp_path / 'run' / 'model'}" in out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # no step was taken or logged
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_a_finished_run_that_died_before_its_exports_writes_them_on_resume(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    make(tmp_path / "run", "trainer.ema_decay=0.5").fit()
    ema = load_file(tmp_path / "run" / "model_ema" / "model.safetensors")
    shutil.rmtree(tmp_path / "run" / "model")
    shutil.rmtree(tmp_path / "run" / "model_ema")
    make(tmp_path / "run", "trainer.ema_decay=0.5", "trainer.checkpoint.resume=latest").fit()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    again = load_file(tmp_path / "run" / "model_ema" / "model.safetensors")
    assert again.keys() == ema.keys() and all(torch.equal(again[k], ema[k]) for k in ema)  # the checkpoint's average


def test_a_data_position_the_loader_refuses_is_a_config_error_naming_the_checkpoint(tmp_path, monkeypatch):
    from fixed_task import FixedBatches

    from vlkit.config import ConfigError

    make(tmp_path / "run", "trainer.max_steps=2").fit()

    def refuse(self, state):
        raise ValueError("cannot resume the data position: saved version=1, this loader has 2")

    monkeypatch.setattr(FixedBatches, "load_state_dict", refuse)
    trainer = make(tmp_path / "run", "trainer.checkpoint.resume=latest")
    with pytest.raises(ConfigError, match=r"step_00000002: cannot resume the data position: saved version=1.*"
                                          r"weights_only=true"):  # fmt: skip
        trainer.fit()


def test_quiet_prints_nothing_and_warmup_longer_than_the_run_warns(tmp_path, capsys):
    trainer = make(tmp_path / "run", "schedule.name=cosine", "schedule.warmup_steps=10")
    trainer.quiet = True
    trainer.fit()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "schedule.warmup_steps=10 >= trainer.max_steps=4" in captured.err
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2  # the metrics are still written


def test_progress_bar_only_on_a_terminal(monkeypatch):
    assert trainer_module._progress(True, 10, 0) is None  # captured output is not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = trainer_module._progress(True, 10, 0)
    assert bar is not None and bar.total == 10
    bar.close()
    assert trainer_module._progress(False, 10, 0) is None


@pytest.mark.parametrize("argv", [["train", "clip-tiny", "--quiet"], ["train", "-q", "clip-tiny", "a.b=1"]])
def test_train_has_quiet(argv):
    from vlkit.cli import build_parser

    assert build_parser(argv).parse_args(argv).quiet is True
