"""Throughput, MFU and the metric sinks (progress bar, JSONL, TensorBoard, one summary line per interval)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 matmul peaks. H100/H200: the ceiling measured with anchors/ (BENCHMARKS.md: 747-790 TFLOP/s), so our
# MFU is comparable with the peers' figures there; A100: the datasheet. An unknown device gets no MFU rather than
# another GPU's peak (set trainer.peak_tflops to report one).
PEAK_BF16_TFLOPS = {"H100": 790.0, "H200": 790.0, "GH200": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


class Throughput:
    """Samples/s (and tokens/s for tasks that count tokens), data-wait fraction and MFU over the current log
    interval."""

    def __init__(self, peak_flops: float | None, world_size: int) -> None:
        self.peak_flops, self.world_size = peak_flops, world_size
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens: int | None = 0
        self.flops: int | None = 0
        self.data_wait = 0.0
        self.steps = 0

    def update(self, samples: int, data_wait: float, flops: int | None, tokens: int | None = None) -> None:
        """``flops``: forward + backward FLOPs this rank did in the step (None when the task cannot count them);
        ``tokens``: tokens it trained on (None: the task counts none)."""
        self.samples += samples
        self.tokens = None if tokens is None or self.tokens is None else self.tokens + tokens
        self.flops = None if flops is None or self.flops is None else self.flops + flops
        self.data_wait += data_wait
        self.steps += 1

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {
            "samples_per_s": self.samples * self.world_size / elapsed,  # global: every rank sees `samples`
            "data_wait_frac": self.data_wait / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
        }
        if self.tokens:
            out["tokens_per_s"] = self.tokens * self.world_size / elapsed  # as samples: this rank's count x ranks
        if self.flops:
            out["tflops_per_device"] = self.flops / elapsed / 1e12
            if self.peak_flops:
                out["mfu"] = self.flops / elapsed / self.peak_flops
        return out


class MetricSinks:
    """Rank 0 writes ``metrics.jsonl`` and TensorBoard events under ``out_dir``; other ranks write nothing."""

    def __init__(self, out_dir: Path, enabled: bool, jsonl: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but keep training if an environment lacks it
                self.tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def format_line(step: int, total: int, m: dict[str, Any]) -> str:
    """The one-line summary printed every log interval."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3g}"]
    if "logit_scale" in m:
        parts.append(f"scale {m['logit_scale']:.2f}")
    if "grad_norm" in m:
        parts.append(f"|g| {m['grad_norm']:.3g}")
    parts.append(f"{m['samples_per_s']:.1f} samples/s")
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:.0f} tokens/s")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "peak_mem_gb" in m:
        parts.append(f"mem {m['peak_mem_gb']:.2f} GB")
    parts.append(f"data wait {100 * m['data_wait_frac']:.0f}%")
    if m.get("skipped_samples"):
        parts.append(f"skipped {m['skipped_samples']}")
    return " | ".join(parts)
