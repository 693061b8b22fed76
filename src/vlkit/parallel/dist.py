"""Process-group setup from torchrun or Slurm environments, and the device mesh every parallelism is applied on."""

from __future__ import annotations

import datetime
import gc
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def env_from_slurm() -> None:
    """Under ``srun`` without torchrun, derive torch.distributed's variables from Slurm's (torchrun's win if set)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def pick_device(accelerator: str = "auto", local_rank: int = 0) -> torch.device:
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=cuda but no CUDA device is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(accelerator: str = "auto", timeout_s: float = 600.0, force: bool = False) -> DistInfo:
    """Join the process group described by the environment (torchrun / Slurm); a single process needs none.

    ``force`` creates a one-process group too (FSDP's mixed precision needs a mesh even on one device).
    The timeout bounds every collective, so a rank that dies makes the others fail instead of hanging.
    """
    env_from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(accelerator, local_rank)
    if (world > 1 or force) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(device: torch.device, tensor_parallel_size: int = 1) -> DeviceMesh | None:
    """A 2-D mesh ("dp", "tp") over all ranks; None when no process group exists."""
    if not dist.is_initialized():
        return None
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"parallel.tensor_parallel_size={tensor_parallel_size} does not divide the world size {world}")
    return init_device_mesh(
        device.type, (world // tensor_parallel_size, tensor_parallel_size), mesh_dim_names=("dp", "tp")
    )


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks: which part of the data it reads.

    Tensor-parallel peers share one data-parallel rank (they must see the same batch), so ``rank`` / ``size`` are the
    mesh's ``dp`` coordinates, not the global rank and world size. ``group`` is the data-parallel process group for
    gathers and reductions over the data (None: the default group, when the data-parallel ranks are all processes).
    """

    rank: int = 0
    size: int = 1
    group: Any = None


def data_parallel_of(mesh: DeviceMesh | None) -> DataParallel:
    """The data-parallel coordinates of this process on the ("dp", "tp") ``mesh`` (one process without a mesh)."""
    if mesh is None:
        return DataParallel()
    dp = mesh["dp"]
    # With tp == 1 the dp ranks are the whole world: the default group serves, and no extra group is needed.
    group = dp.get_group() if mesh["tp"].size() > 1 else None
    return DataParallel(rank=dp.get_local_rank(), size=dp.size(), group=group)


def cleanup(wait_for_peers: bool = True) -> None:
    """Tear the process groups down on every rank together.

    A rank that destroys its groups while a peer is still talking to it, or that leaves group objects (held by FSDP
    meshes) to interpreter shutdown, can abort inside gloo's C++ threads and turn a finished run into a crash. So:
    collect dead objects first, meet the peers at a barrier, then destroy. After a failure the peers may never reach
    the barrier; pass ``wait_for_peers=False`` there.
    """
    gc.collect()
    if not dist.is_initialized():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
