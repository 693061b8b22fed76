"""Kill a CPU training run with SIGKILL mid-way, resume it, and end with weights bitwise identical to a run that was
never interrupted (real data pipeline: synthetic shards, 2 loader workers, random crops)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 24
COMMON = [
    "model.text.vocab_size=49408",
    f"trainer.max_steps={STEPS}",
    "trainer.micro_batch_size=16",
    "trainer.checkpoint.every_n_steps=2",
    "trainer.checkpoint.keep_last=3",
    "trainer.logging.log_every_n_steps=4",
    "trainer.logging.tensorboard=false",
    "data.num_workers=2",
    "data.shuffle_buffer=64",
    "schedule.warmup_steps=5",
]


def train(out: Path, shapes: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "vlkit", "train", "clip-tiny-shapes", f"trainer.output_dir={out}",
           f"data.train_path={shapes}", *COMMON, *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_model(out: Path) -> dict:
    ckpt = out / "checkpoints"
    return load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "model.safetensors"))


def latest_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[-1]) if pointer.is_file() else -1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlkit.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=320, val=50, size=32, shard_size=40, progress=False, workers=1)
    return root


def test_sigkill_and_resume_is_bitwise_identical(tmp_path, shapes):
    straight = tmp_path / "straight"
    train(straight, shapes)

    killed = tmp_path / "killed"
    proc = train(killed, shapes, wait=False)
    deadline = time.time() + 600
    while latest_step(killed) < STEPS // 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_step(killed)
    assert 0 < stopped_at < STEPS

    result = train(killed, shapes, "trainer.checkpoint.resume=latest")
    assert f"resumed from step {stopped_at}" in result.stdout + result.stderr
    resumed, reference = final_model(killed), final_model(straight)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resume"
