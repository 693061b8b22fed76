"""What the benchmarks share: the machine record, OOM detection, number cells, ratios and plain-text tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch


def package_version(dist_name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None


def machine_info(device: torch.device, packages: Sequence[str] = ()) -> dict[str, Any]:
    """What a benchmark ran on: host, load, torch build and settings, GPU, and the versions of ``packages``."""
    import vlkit

    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        **{name: package_version(name) for name in packages},
        "vlkit": vlkit.__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    cpu_model = _cpu_model()
    if cpu_model:
        info["cpu_model"] = cpu_model
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA's, or one that only says so in its message)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, (oom, torch.cuda.OutOfMemoryError)) or "out of memory" in str(e).lower()


def fmt(v: float | None, spec: str, missing: str = "-") -> str:
    """``v`` formatted by ``spec``, or ``missing`` when there is no value."""
    return missing if v is None else format(v, spec)


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or the denominator is zero."""
    return num / den if num is not None and den else None


def format_columns(head: list[str], rows: list[list[Any]], left: Sequence[int] = (0,), rule: bool = False) -> list[str]:
    """``head`` and ``rows`` as aligned text lines: the ``left`` columns left-aligned, the others (numbers)
    right-aligned, and a dashed line under the head with ``rule``."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def join(cells: list) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines = [join(head)]
    if rule:
        lines.append("-" * len(lines[0]))
    return lines + [join(r) for r in rows]
