"""Parallelism applied from outside the model: process groups and meshes, TP, activation checkpointing, compile,
FSDP2 / DDP, precision."""

from vlkit.parallel.checkpointing import apply_activation_checkpointing, towers
from vlkit.parallel.dist import DataParallel, DistInfo, build_mesh, cleanup, data_parallel_of, init_distributed
from vlkit.parallel.grad_norm import clip_grad_norm_
from vlkit.parallel.parallelize import ParallelPlan, parallelize, resolve_data_parallel

__all__ = [
    "DataParallel",
    "DistInfo",
    "ParallelPlan",
    "apply_activation_checkpointing",
    "build_mesh",
    "cleanup",
    "clip_grad_norm_",
    "data_parallel_of",
    "init_distributed",
    "parallelize",
    "resolve_data_parallel",
    "towers",
]
