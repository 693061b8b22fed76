"""Checkpoints: exact resume, RNG, schedulers, pruning, atomicity under exceptions and SIGKILL, clear errors, DCP."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlkit
import vlkit.train.checkpoint as ckpt
from vlkit.train.checkpoint import CheckpointError, CheckpointManager
from vlkit.train.rng import capture_rng_state, restore_rng_state

WORKER = Path(__file__).with_name("ckpt_worker.py")
REPO = Path(__file__).resolve().parents[2]

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


def _clip():
    # Dropout makes the forward pass itself consume the torch RNG, so a resume is exact only if it is restored.
    # A 1000-token vocabulary keeps the test fast: the 49408-row embedding is most of clip-tiny's compute here.
    return vlkit.create_model(
        "clip-tiny", vision__hidden_dropout=0.1, text__hidden_dropout=0.1, text__vocab_size=1000, text__eot_token_id=999
    )


def _train(model, optimizer, scheduler, steps: int) -> None:
    """Batches come from the global torch RNG on purpose: the resumed run must draw the same ones."""
    for _ in range(steps):
        if hasattr(model, "encode_text"):
            out = model(torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 77)))
            loss = F.cross_entropy(out["logit_scale"] * out["image_features"] @ out["text_features"].T, torch.arange(4))
        else:
            loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_models_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _warmup_cosine(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.5 ** (s / 10))


@pytest.mark.parametrize(
    "model_name, opt_name",
    [("clip-tiny", "adamw"), *[("vit-tiny", o) for o in OPTIMIZERS if o != "adamw"]],
)
def test_resume_continues_bitwise_identically(tmp_path, model_name, opt_name):
    build = _clip if model_name == "clip-tiny" else lambda: vlkit.create_model("vit-tiny")
    torch.manual_seed(0)
    model = build()
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    scheduler = _warmup_cosine(optimizer)
    _train(model, optimizer, scheduler, 2)
    manager = CheckpointManager(tmp_path)
    manager.save(2, model, optimizer, scheduler, state={"samples_seen": 8})
    _train(model, optimizer, scheduler, 3)

    torch.manual_seed(1)  # a different initialisation and a different RNG position: the load must undo both
    fresh = build()
    fresh_opt = OPTIMIZERS[opt_name](fresh.parameters())
    fresh_sched = _warmup_cosine(fresh_opt)
    assert manager.load("latest", fresh, fresh_opt, fresh_sched) == {"samples_seen": 8}
    _train(fresh, fresh_opt, fresh_sched, 3)

    _assert_models_equal(model, fresh)
    original, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for i, s in original["state"].items():
        for name, value in s.items():
            other = restored["state"][i][name]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.device == other.device and torch.equal(value, other)
            else:
                assert value == other, (i, name)


def test_single_format_files(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    _train(model, optimizer, None, 1)
    path = CheckpointManager(tmp_path).save(1, model, optimizer)
    assert path == tmp_path / "step_00000001"
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "train_state.json", "rng_rank00000.json", "config.json",
    }  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        step = f.get_tensor("state.0.step")
        assert "state.0.exp_avg" in f.keys() and step.dtype == torch.float32 and step.item() == 1  # noqa: SIM118
    info = json.loads((path / "train_state.json").read_text())
    assert info["kind"] == "single" and info["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    # Nothing pickled anywhere: every file is safetensors or JSON.
    for f in path.iterdir():
        assert f.suffix in (".safetensors", ".json"), f
    # The checkpoint directory is also a vlkit model directory.
    _assert_models_equal(model, vlkit.load_model(path))


def test_rng_capture_restore_gives_the_same_numbers():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = json.loads(json.dumps(capture_rng_state()))
    first = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


@pytest.mark.parametrize("kind", ["lambda", "cosine", "warmup-then-cosine", "plateau"])
def test_scheduler_round_trip(tmp_path, kind):
    def build():
        model = torch.nn.Linear(3, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        lr_scheduler = torch.optim.lr_scheduler
        if kind == "lambda":
            return model, optimizer, lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
        if kind == "cosine":
            return model, optimizer, lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        if kind == "plateau":
            return model, optimizer, lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        warmup = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        return model, optimizer, lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])

    def advance(optimizer, scheduler, n):
        lrs = []
        for i in range(n):
            optimizer.step()
            scheduler.step(1.0 + i % 2) if kind == "plateau" else scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return lrs

    model, optimizer, scheduler = build()
    advance(optimizer, scheduler, 4)
    manager = CheckpointManager(tmp_path)
    manager.save(4, model, optimizer, scheduler)
    expected = advance(optimizer, scheduler, 4)
    model2, optimizer2, scheduler2 = build()
    manager.load(None, model2, optimizer2, scheduler2)
    assert advance(optimizer2, scheduler2, 4) == expected


def test_keep_last_prunes_only_complete_older_checkpoints(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    broken = tmp_path / "step_00000000"
    broken.mkdir(parents=True)  # not complete: neither counted nor deleted
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save(step, model, optimizer)
    assert [p.name for p in manager.checkpoints()] == ["step_00000004", "step_00000005"]
    assert broken.is_dir() and manager.latest() == tmp_path / "step_00000005"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for step in range(1, 4):
        keep_all.save(step, model, optimizer)
    assert len(keep_all.checkpoints()) == 3


def test_exception_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model, optimizer, state={"step": 1})

    real = ckpt._save_tensors

    def failing(tensors, file):
        if file.name == ckpt.OPTIM_FILE:
            raise OSError("disk full")
        real(tensors, file)

    monkeypatch.setattr(ckpt, "_save_tensors", failing)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        manager.save(2, model, optimizer, state={"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert [p.name for p in tmp_path.iterdir() if p.name != "latest"] == ["step_00000001"]
    fresh = vlkit.create_model("vit-tiny")
    assert manager.load(None, fresh, torch.optim.AdamW(fresh.parameters())) == {"step": 1}


def test_unstorable_state_fails_before_writing(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\.loader: a object cannot be stored"):
        manager.save(1, torch.nn.Linear(2, 2), None, state={"loader": object()})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_sigkill_during_save_leaves_a_loadable_latest(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "saver", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "paused":
                break
        assert lines == ["saved 1", "saved 2", "paused"], (lines, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGKILL)  # mid-save: the model file is written, the optimizer's is not
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step_00000003")]
    assert leftovers, "the kill should have interrupted step 3's save"

    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() == tmp_path / "step_00000002"
    model = vlkit.create_model("clip-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert manager.load(None, model, optimizer) == {"step": 2}
    assert all(bool((p == 2.0).all()) for p in model.parameters())
    assert optimizer.state_dict()["state"][0]["step"].item() == 2
    manager.save(3, model, optimizer)  # the next successful save clears the dead saver's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_latest_skips_a_dangling_or_invalid_pointer(tmp_path):
    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path, keep_last=0)
    assert manager.latest() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.load(None, model)
    manager.save(1, model, None)
    manager.save(2, model, None)
    (tmp_path / "latest").write_text("step_00000099\n")
    assert manager.latest() == tmp_path / "step_00000002"
    (tmp_path / "latest").write_text("../../etc\n")
    assert manager.latest() == tmp_path / "step_00000002"
    (tmp_path / "step_00000002" / "model.safetensors").unlink()
    (tmp_path / "latest").write_text("step_00000002\n")
    assert manager.latest() == tmp_path / "step_00000001"


def test_incomplete_checkpoint_names_the_missing_file(tmp_path):
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    path = CheckpointManager(tmp_path).save(1, model, optimizer)
    manager = CheckpointManager(tmp_path)
    with open(path / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors has 100 bytes"):
        manager.load(path, model, optimizer)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is missing"):
        manager.load(path, model, optimizer)
    (path / "train_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"train_state\.json is missing"):
        manager.load("step_00000001", model)


def test_shape_mismatch_names_the_parameter_and_changes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, vlkit.create_model("vit-tiny"), None)
    other = vlkit.create_model("vit-tiny", num_classes=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(10, 64\), model \(5, 64\)"):
        manager.load(None, other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_optimizer_over_other_parameters_is_refused(tmp_path):
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer)
    reordered = torch.optim.AdamW(list(model.parameters())[::-1])
    with pytest.raises(CheckpointError, match="position 0 holds 'backbone"):
        manager.load(None, model, reordered)


class _CompiledBlock(torch.nn.Module):
    """What per-block ``torch.compile`` leaves inside a model: the block under ``_orig_mod``."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self._orig_mod = block

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_compile_prefix_is_stripped(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("vit-tiny")
    blocks = model.backbone.transformer.blocks
    blocks[0] = _CompiledBlock(blocks[0])
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it runs, and it never runs here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert any("._orig_mod." in k for k in compiled.state_dict())
    optimizer = torch.optim.AdamW(compiled.parameters())
    _train(model, optimizer, None, 1)
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, compiled, optimizer)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert "backbone.transformer.blocks.0.attn.qkv.weight" in keys and not any("_orig_mod" in k for k in keys)

    plain = vlkit.create_model("vit-tiny")
    manager.load(path, plain, torch.optim.AdamW(plain.parameters()))
    assert torch.equal(plain.backbone.transformer.blocks[0].attn.qkv.weight, blocks[0]._orig_mod.attn.qkv.weight)
    again = torch.compile(vlkit.create_model("vit-tiny"))
    manager.load(path, again, torch.optim.AdamW(again.parameters()))
    assert torch.equal(again.head.weight, model.head.weight)


def test_sharded_format_in_one_process(tmp_path):
    torch.manual_seed(0)
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    _train(model, optimizer, None, 2)
    manager = CheckpointManager(tmp_path)
    path = manager.save(2, model, optimizer, state={"pos": [1, 2]}, sharded=True)
    assert (path / ".metadata").is_file() and not (path / "model.safetensors").exists()
    _train(model, optimizer, None, 2)

    torch.manual_seed(1)
    fresh = vlkit.create_model("vit-tiny")
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    assert manager.load(path, fresh, fresh_opt) == {"pos": [1, 2]}
    _train(fresh, fresh_opt, None, 2)
    _assert_models_equal(model, fresh)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_sharded_metadata_is_never_unpickled_blindly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path / "run")
    path = manager.save(1, model, None, sharded=True)
    metadata = path / ".metadata"
    metadata.write_bytes(pickle.dumps(_Boom()))
    info = json.loads((path / "train_state.json").read_text())
    info["files"][".metadata"] = metadata.stat().st_size  # make it look complete
    (path / "train_state.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        manager.load(path, model)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_distributed_fsdp2_sharded_and_ddp(tmp_path, torchrun):
    result = torchrun(WORKER, 2, "distributed", str(tmp_path))
    for rank in (0, 1):
        for case in ("fsdp sharded=None", "fsdp sharded=False", "ddp sharded=None"):
            assert f"rank {rank}: {case} ok" in result.stdout


@pytest.mark.parametrize("sharded", [False, True])
def test_save_before_the_first_step_does_not_advance_the_optimizer(tmp_path, sharded):
    # DCP's state-dict helpers initialise an empty optimizer with a zero-lr step, which would bump Adam's step
    # counter; a checkpoint taken before training must resume exactly like a run that never saved.
    torch.manual_seed(0)
    model = vlkit.create_model("vit-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(tmp_path)
    manager.save(0, model, optimizer, sharded=sharded)
    assert not optimizer.state
    _train(model, optimizer, None, 2)

    torch.manual_seed(1)
    fresh = vlkit.create_model("vit-tiny")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    manager.load(None, fresh, fresh_opt)
    assert not fresh_opt.state and fresh_opt.param_groups[0]["lr"] == 1e-2
    _train(fresh, fresh_opt, None, 2)
    _assert_models_equal(model, fresh)
