"""Skipped and repaired samples of the training data reach metrics.jsonl and TensorBoard, summed over the
data-parallel ranks (tested through the trainer, from a config, on a shard holding bad samples)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.config import load_config
from vlkit.tasks.clip import CLIPTask
from vlkit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, good: int) -> None:
    """Two corrupt images and one sample without a caption, then ``good`` image-caption pairs."""
    members = [("a_bad0.jpg", b"\xff\xd8 not a jpeg"), ("a_bad0.txt", b"a broken photo")]
    members += [("a_bad1.jpg", _jpeg(1)[:40]), ("a_bad1.txt", b"a cut photo")]
    members += [("a_lonely.jpg", _jpeg(2))]
    for i in range(good):
        members += [(f"s{i:04d}.jpg", _jpeg(i)), (f"s{i:04d}.txt", f"a photo number {i}".encode())]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_skipped_samples_reach_the_metrics(tmp_path):
    write_shard(tmp_path / "000000.tar", good=12)
    cfg = load_config("clip-tiny", [
        "data.kind=webdataset", f"data.train_path={tmp_path}/000000.tar", "data.val_path=null",
        "data.num_workers=0", "data.shuffle_buffer=1", "trainer.micro_batch_size=4", "trainer.max_steps=3",
        "trainer.logging.log_every_n_steps=1", "trainer.save_model=false", f"trainer.output_dir={tmp_path}/run",
    ])  # fmt: skip
    Trainer(cfg, CLIPTask).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    # The 3 bad samples come first: each is skipped once, counted by reason, and the 12 good ones fill 3 batches.
    assert last["skipped_samples"] == 3
    assert sum(v for k, v in last.items() if k.startswith("skipped/")) == 3
    assert {k for k in last if k.startswith("skipped/")} == {
        "skipped/unidentified",
        "skipped/truncated",
        "skipped/no_caption",
    }
    assert last["repaired_samples"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert events.Scalars("skipped_samples")[-1].value == 3
