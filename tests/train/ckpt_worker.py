"""Child processes for ``test_checkpoint.py``.

``ckpt_worker.py distributed DIR`` (under torchrun, 2 gloo ranks): FSDP2 sharded save/load, FSDP2 saved in the
single-process format, and DDP saved by rank 0 — each time the restored copy must equal the original bitwise and keep
training identically, and each rank must get its own random stream back.

``ckpt_worker.py saver DIR``: saves clip-tiny in a loop with every weight equal to the step; at the third save it
announces that it is between writing the model and the optimizer and waits there to be killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vlkit
import vlkit.train.checkpoint as ckpt
from vlkit.parallel import cleanup
from vlkit.train.checkpoint import CheckpointManager


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.6 keeps it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def build(kind: str, seed: int, mesh=None):
    torch.manual_seed(seed)
    model = vlkit.create_model("vit-tiny")
    if kind == "fsdp":
        fully_shard = _fully_shard()
        for block in model.backbone.transformer.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** (s // 2))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int, seed: int) -> None:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def full_state(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys())[:5])
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, (where, a, b)


def round_trip(kind: str, directory: Path, mesh, sharded: bool | None) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, scheduler = build(kind, 0, mesh)
    train(model, optimizer, scheduler, 2, seed=1)
    manager = CheckpointManager(directory, keep_last=2, rank=rank, world_size=world)
    torch.manual_seed(1000 + rank)  # each rank's own stream, to be restored per rank
    path = manager.save(2, model, optimizer, scheduler, state={"samples": 16, "rank_kind": kind}, sharded=sharded)
    expected_draw = torch.rand(4)
    files = {p.name for p in path.iterdir()}
    assert {"train_state.json", "rng_rank00000.json", "rng_rank00001.json"} <= files, files
    if sharded or (sharded is None and kind == "fsdp"):
        assert ".metadata" in files and "model.safetensors" not in files, files
    else:
        assert "model.safetensors" in files and ".metadata" not in files, files
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert not any(k.startswith("module.") for k in f.keys()), list(f.keys())[:3]  # noqa: SIM118

    fresh, fresh_opt, fresh_sched = build(kind, 7, mesh)
    torch.manual_seed(5)
    state = manager.load(None, fresh, fresh_opt, fresh_sched)
    assert state == {"samples": 16, "rank_kind": kind}, state
    assert torch.equal(torch.rand(4), expected_draw), f"rank {rank}: RNG stream not restored"
    assert_same(full_state(model, optimizer), full_state(fresh, fresh_opt), "state")
    assert fresh_sched.state_dict()["last_epoch"] == 2 and fresh_sched.get_last_lr() == scheduler.get_last_lr()

    train(model, optimizer, scheduler, 2, seed=2)
    train(fresh, fresh_opt, fresh_sched, 2, seed=2)
    assert_same(full_state(model, optimizer), full_state(fresh, fresh_opt), "after 2 more steps")
    print(f"rank {rank}: {kind} sharded={sharded} ok", flush=True)


def distributed(directory: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        round_trip("fsdp", directory / "fsdp", mesh, sharded=None)
        round_trip("fsdp", directory / "fsdp_single", mesh, sharded=False)
        round_trip("ddp", directory / "ddp", None, sharded=None)
    except BaseException:
        cleanup(wait_for_peers=False)  # the peers may never reach a barrier
        raise
    cleanup()


def saver(directory: Path) -> None:
    model = vlkit.create_model("clip-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CheckpointManager(directory, keep_last=2)
    write = ckpt._save_tensors

    def announcing_write(tensors, file):
        if file.name == ckpt.OPTIM_FILE and step == 3:
            print("paused", flush=True)
            sys.stdin.readline()  # never answered: the parent kills us here, mid-save
        write(tensors, file)

    ckpt._save_tensors = announcing_write
    for step in range(1, 10):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        manager.save(step, model, optimizer, state={"step": step})
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    {"distributed": distributed, "saver": saver}[sys.argv[1]](Path(sys.argv[2]))
