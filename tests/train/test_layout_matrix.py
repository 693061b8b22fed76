"""Every task trains alike under every parallel layout: per-step losses and final weights equal the task's
one-process run. The table of runs is tests/train/layout_worker.py's ``layouts``; docs/training.md shows it.

All runs of a kind share one process launch (the one-process references, the 2-rank layouts, the 4-rank FSDP x TP
mesh), so the matrix costs three launches: about 2 minutes on 2 idle cores."""

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlkit.data.shapes import write_shapes_dataset
from vlkit.data.shapes_vqa import write_shapes_vqa

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from layout_worker import layouts  # noqa: E402

WORKER = HERE / "layout_worker.py"
TASKS = ("clip", "classify", "neva")
# fp32 layouts differ from one process only in the order of sums (all-reduce, sharded matmuls, recomputation).
FP32_RTOL = 1e-5
# O2 computes in bf16 (8-bit mantissa, rounding 2^-8 = 0.4% per operation), with fp32 master weights and reductions:
# the loss stays within a few roundings of fp32, and the update points the same way as fp32's.
O2_LOSS_RTOL = 3e-2
O2_MIN_COSINE = 0.99


def runs_of(nproc: int) -> list[str]:
    return [f"{t}:{name}" for t in TASKS for name, (n, _) in layouts(t).items() if n == nproc and name != "single"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, torchrun) -> Path:
    root = tmp_path_factory.mktemp("layout-data")
    write_shapes_dataset(root / "clip", train=48, val=8, size=32, shard_size=1000, workers=1, progress=False)
    prepend_a_corrupt_sample(root / "clip" / "train" / "000000.tar")
    write_shapes_dataset(root / "classify", train=64, val=8, size=32, classification=True, workers=1, progress=False)
    write_shapes_vqa(root / "neva", train=32, val=4, progress=False)
    out = tmp_path_factory.mktemp("layouts")
    import subprocess

    single = [f"{t}:single" for t in TASKS] + runs_of(1)
    result = subprocess.run([sys.executable, str(WORKER), str(root), str(out), *single], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    torchrun(WORKER, 2, str(root), str(out), *runs_of(2), timeout=600)
    torchrun(WORKER, 4, str(root), str(out), *runs_of(4), timeout=600)
    return out


def prepend_a_corrupt_sample(shard: Path) -> None:
    """A sample whose image does not decode, first in the shard: every layout skips it once and counts it once."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in (("0broken.jpg", b"not a jpeg"), ("0broken.txt", b"a broken photo")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def read(out: Path, task: str, layout: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    run = out / task / layout
    return json.loads((run / "losses.json").read_text()), load_file(str(run / "final.safetensors"))


def relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b}


CASES = [(t, name) for t in TASKS for name in layouts(t) if name != "single"]


@pytest.mark.parametrize(("task", "layout"), CASES, ids=[f"{t}-{n}" for t, n in CASES])
def test_layout_trains_like_one_process(matrix, task, layout):
    ref_losses, ref_weights = read(matrix, task, "single")
    losses, weights = read(matrix, task, layout)
    assert len(losses) == len(ref_losses) == 3
    if layout == "o2":
        assert losses == pytest.approx(ref_losses, rel=O2_LOSS_RTOL)
        initial = load_file(str(matrix / task / "single" / "initial.safetensors"))
        ours = torch.cat([(weights[k] - initial[k]).flatten() for k in initial])
        ref = torch.cat([(ref_weights[k] - initial[k]).flatten() for k in initial])
        assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=0)) >= O2_MIN_COSINE
        return
    assert losses == pytest.approx(ref_losses, rel=FP32_RTOL)
    errors = relative_errors(weights, ref_weights)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FP32_RTOL, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("layout", [n for n in layouts("clip") if n != "single"])
def test_skipped_samples_are_counted_once_in_every_layout(matrix, layout):
    """The corrupt sample is skipped by whichever data-parallel rank reads it and counted once: summed over the
    data-parallel ranks, not over tensor-parallel peers (which read it too)."""
    for name in ("single", layout):
        counters = json.loads((matrix / "clip" / name / "counters.json").read_text())
        assert counters == {"skipped_samples": 1, "repaired_samples": 0}, name


def test_the_runs_really_train(matrix):
    """Each task's reference moved its weights and changed its loss: the comparisons above are not of idle runs."""
    for task in TASKS:
        losses, weights = read(matrix, task, "single")
        initial = load_file(str(matrix / task / "single" / "initial.safetensors"))
        assert losses[0] != losses[-1]
        assert max(relative_errors(weights, initial).values()) > 100 * FP32_RTOL


def test_classify_weight_average_matches(matrix):
    """The EMA (trainer.ema_decay) exported at the end is the same under data and tensor parallelism."""
    ref = load_file(str(matrix / "classify" / "single" / "model_ema" / "model.safetensors"))
    for layout in ("ddp", "tp", "fsdp_tp"):
        ema = load_file(str(matrix / "classify" / layout / "model_ema" / "model.safetensors"))
        assert max(relative_errors(ema, ref).values()) <= FP32_RTOL, layout
