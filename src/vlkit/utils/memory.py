"""How much memory a model needs, against how much the machine has: absurd sizes are refused before allocation.

The estimate counts parameters on the meta device (no weights allocated) and multiplies by bytes per parameter:
the stored dtype to hold a model; for training, fp32 weights + gradients + the optimizer's state for what trains
(AdamW: two fp32 moments, so 16 bytes per trainable parameter). Activations, buffers and the allocator's slack come
on top, so the figure is a lower bound and a config is refused only when even that cannot fit.

The key blamed for a size is found from the model's largest group of tensors (``blocks.*.mlp.fc1.weight`` over all
layers): the config value equal to one of its dimensions or to its layer count, the largest such. A width of 10^9 is
then named as ``model.vision.hidden_size=1000000000`` whether it came from a preset override, a YAML file or a
Hugging Face ``config.json``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlkit.utils.errors import UserError

# Optimizer state per trainable parameter, in fp32 values (Adam's two moments; SGD's momentum; Adafactor's
# factored second moment is a row and a column per matrix, negligible here).
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "distributed_fused_adam": 2, "sgd": 1, "adafactor": 0}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_SIZES = re.compile(r"sizes=\[([\d,\s]+)\]")


class TooLargeError(UserError, ValueError):
    """A model that cannot be held on this machine (or by torch at all); the message names the key and the size."""


@dataclass
class MemoryEstimate:
    """A lower bound of the memory a model needs.

    Attributes:
        parameters: unique parameters (tied weights once).
        bytes: the estimate in bytes.
        what: the estimate in words, e.g. ``"the model needs ~3.1 TB for its 780,000,000,000 parameters (fp32)"``.
        key: ``key=value`` of the config value that makes the model this large (None when no value stands out).
    """

    parameters: int
    bytes: int
    what: str
    key: str | None = None


def format_bytes(n: float) -> str:
    """``3.1 TB``, ``24 GB``, ``512 MB``: decimal units, two significant digits past the first where it matters."""
    for unit, size in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def host_memory() -> int:
    """Total RAM of this machine in bytes (MemTotal; the page count from sysconf where /proc is absent)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: nothing is refused


def machine_memory(accelerator: str = "auto", processes: int | None = None) -> tuple[int, str]:
    """(bytes, description) of the memory a job may use at most: every GPU it runs on, or every node's RAM.

    ``processes``: the job's process count (one GPU each); None reads ``WORLD_SIZE`` (torchrun / srun) or 1.
    On the CPU the processes of one node share its RAM, so the total is RAM x nodes.
    """
    world = processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
    if accelerator != "cpu" and torch.cuda.is_available():
        per_gpu = torch.cuda.get_device_properties(0).total_memory
        gpus = max(world, 1)
        where = f"{gpus} GPUs with {format_bytes(per_gpu)} each" if gpus > 1 else f"the GPU has {format_bytes(per_gpu)}"
        return per_gpu * gpus, where
    nodes = max(world // max(int(os.environ.get("LOCAL_WORLD_SIZE", world) or world), 1), 1)
    ram = host_memory()
    where = f"{nodes} machines with {format_bytes(ram)} each" if nodes > 1 else f"this machine has {format_bytes(ram)}"
    return ram * nodes, where


# --------------------------------------------------------------------------------------------- the key to blame


def config_values(config: Any, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Every positive integer in a config (dataclasses, dicts, lists), as ``(dotted key, value)``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        items = ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    elif isinstance(config, dict):
        items = ((str(k), v) for k, v in config.items())
    elif isinstance(config, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return
    for name, value in items:
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, int) and not isinstance(value, bool):
            if value > 1:
                yield key, value
        else:
            yield from config_values(value, key)


def _largest_group(model: nn.Module) -> tuple[tuple[int, ...], int] | None:
    """(shape, repeats) of the model's largest group of parameters, a group being one name over every layer
    (``blocks.3.attn.qkv.weight`` and ``blocks.4.attn.qkv.weight`` are one group of two)."""
    groups: dict[str, list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), [tuple(p.shape), 0, 0])
        group[1] += 1
        group[2] += p.numel()
    if not groups:
        return None
    shape, repeats, _ = max(groups.values(), key=lambda g: g[2])
    return shape, repeats


def blame_key(config: Any, dims: tuple[int, ...], prefix: str = "") -> str | None:
    """``key=value`` of the largest config value equal to one of ``dims`` (None when none is)."""
    wanted = set(dims)
    matches = [(value, key) for key, value in config_values(config, prefix) if value in wanted]
    if not matches:
        return None
    value, key = max(matches, key=lambda m: m[0])
    return f"{key}={value}"


def _model_key(model: nn.Module, config: Any, prefix: str) -> str | None:
    group = _largest_group(model)
    return None if group is None else blame_key(config, (*group[0], group[1]), prefix)


# --------------------------------------------------------------------------------------------- estimates


def build_on_meta(build: Callable[[], nn.Module], config: Any, prefix: str = "model", where: str = "") -> nn.Module:
    """``build()`` under the meta device; a tensor too large for torch to describe at all (more than 2^63 bytes)
    becomes a TooLargeError naming the config key of its size."""
    try:
        with torch.device("meta"):
            return build()
    except RuntimeError as e:
        found = _SIZES.search(str(e))
        if "overflow" not in str(e) or found is None:
            raise
        dims = tuple(int(d) for d in found.group(1).replace(" ", "").split(",") if d)
        key = blame_key(config, dims, prefix)
        numel = 1
        for d in dims:
            numel *= d
        head = f"{where}: " if where else ""
        raise TooLargeError(
            f"{head}{key + ': ' if key else ''}the model needs a tensor of shape {list(dims)}, "
            f"~{format_bytes(numel * 4)} (fp32) on its own, more than any machine holds"
        ) from None


def estimate_model(model: nn.Module, config: Any, *, dtype: str = "fp32", prefix: str = "model") -> MemoryEstimate:
    """The memory of ``model``'s parameters at ``dtype`` (fp32 | bf16 | fp16): what loading it takes at least."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    size = total * _DTYPE_BYTES.get(dtype, 4)
    what = f"the model needs ~{format_bytes(size)} for its {total:,} parameters ({dtype})"
    return MemoryEstimate(total, size, what, _model_key(model, config, prefix))


def estimate_training(
    model: nn.Module, config: Any, *, precision: str = "fp32", optimizer: str = "adamw", prefix: str = "model"
) -> MemoryEstimate:
    """What training ``model`` takes at least: fp32 weights, gradients and optimizer state for trainable
    parameters; frozen ones at the compute dtype (``precision``)."""
    seen, trainable, frozen = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    states = _OPTIMIZER_STATES.get(optimizer, 2)
    per_param = 4 * (2 + states)
    total = trainable * per_param + frozen * _DTYPE_BYTES.get(precision, 4)
    what = (
        f"training needs at least ~{format_bytes(total)}: {trainable:,} trainable parameters x {per_param} bytes "
        f"(fp32 weights, gradients and {optimizer} state)"
    )
    if frozen:
        what += f" + {frozen:,} frozen x {_DTYPE_BYTES.get(precision, 4)} bytes ({precision})"
    return MemoryEstimate(trainable + frozen, total, what, _model_key(model, config, prefix))


def too_large(estimate: MemoryEstimate, available: int, machine: str) -> str | None:
    """The refusal for an estimate above ``available`` bytes (None when it fits or the machine's size is unknown):
    ``model.vision.hidden_size=...: the model needs ~3.1 TB of parameters (fp32), this machine has 24 GB``."""
    if available <= 0 or estimate.bytes <= available:
        return None
    head = f"{estimate.key}: " if estimate.key else ""
    return f"{head}{estimate.what}, {machine}"
