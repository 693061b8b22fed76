"""Parallelism applied from outside the model: process groups and meshes, TP, activation checkpointing, compile,
FSDP2 / DDP, precision."""

from vlkit.parallel.checkpointing import apply_activation_checkpointing, towers
from vlkit.parallel.dist import DistInfo, build_mesh, cleanup, init_distributed
from vlkit.parallel.parallelize import ParallelPlan, parallelize, resolve_data_parallel

__all__ = [
    "DistInfo",
    "ParallelPlan",
    "apply_activation_checkpointing",
    "build_mesh",
    "cleanup",
    "init_distributed",
    "parallelize",
    "resolve_data_parallel",
    "towers",
]
