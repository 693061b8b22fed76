"""One prepared GPU call that checks and times what BENCHMARKS.md promises: ``make gpu-check`` (``DRY=1``: the CPU
rehearsal the test suite runs).

GPU time comes in one call of at most ~9 minutes, so the steps run in sequence, each in its own process with its own
time budget, and ``gpu_check.json`` is rewritten after every step: a step that fails or runs out of time never loses
the others' results. The steps:

1. ``fused``: the fused loss's correctness (bf16 and fp32 against a float64 reference at small B, against the naive
   fp32 loss at B = 16 384: loss, both feature gradients, the logit-scale gradient) and its speed against the naive
   loss and ``torch.compile(naive)`` (``vlkit bench fused``);
2. ``loss``: naive vs tiled vs fused, bf16 features, B = 16 384 / 65 536 / 98 304 / 262 144, D = 512, forward +
   backward, median of 10, peak extra memory (``vlkit bench loss``; the naive loss is skipped where B x B logits do not
   fit);
3. ``train-clip-b16`` / ``train-vit-b16`` / ``train-llama-1b``: ``vlkit bench train`` against open_clip, timm and
   transformers, eager and compiled;
4. ``run-clip-b16``: a real ``vlkit train`` of clip-b16 on the synthetic shapes (bf16, fused loss, per-block compile)
   and the same steps in eager fp32: the losses must agree within ``RUN_LOSS_RTOL``.

At the end it prints one markdown table (ours, the peers', the goals of BENCHMARKS.md) and writes ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bf16 autocast + compile against eager fp32 over the same 50 steps: the per-step losses of the last 10 steps may differ
# by the rounding of bf16 matmuls (2^-8 relative per operation), not by a different trajectory.
RUN_LOSS_RTOL = 0.03
# The goals of ../shared/BENCHMARKS.md, next to which the measured numbers are printed.
GOALS = {
    "loss B=65536": "fused <= 33 ms (bf16, D=512, forward + backward)",
    "train-clip-b16": ">= 3300 samples/s (>= 52% MFU); open_clip: 1725 eager, 2607 compiled (H100)",
    "train-vit-b16": ">= 3900 img/s; timm: 2568 eager, 3305 compiled (H100)",
    "train-llama-1b": ">= 52000 tokens/s; transformers: 44300 (H100)",
}


@dataclass
class Step:
    name: str
    budget_s: float  # this step's share of the call
    argv: list[str]  # after `python`: ["-m", module, options...]; `--out <its folder>` is appended
    result: str | None = None  # the JSON file the step writes, relative to its folder
    env: dict[str, str] = field(default_factory=dict)


def steps(dry: bool) -> list[Step]:
    """The sequence; ``dry``: tiny sizes on the CPU (Triton's interpreter), the same code paths."""
    if dry:
        interp = {"TRITON_INTERPRET": "1"}
        return [
            Step(
                "fused",
                120,
                [
                    "-m",
                    "vlkit.bench.fused",
                    "--device",
                    "cpu",
                    "--batch-sizes",
                    "64",
                    "--no-autotune",
                    "--rep-ms",
                    "5",
                    "--check-batches",
                    "37",
                    "--naive-check-batch",
                    "64",
                ],
                "fused_check.json",
                interp,
            ),
            Step(
                "loss",
                60,
                [
                    "-m",
                    "vlkit.bench.loss",
                    "--device",
                    "cpu",
                    "--batch-sizes",
                    "64,128",
                    "--dims",
                    "32",
                    "--impls",
                    "naive,tiled",
                    "--repeats",
                    "2",
                    "--no-memory",
                ],
                "loss_bench.json",
            ),
            Step(
                "train-clip-b16",
                90,
                [
                    "-m",
                    "vlkit.bench.train",
                    "--model",
                    "clip-tiny",
                    "--batch-size",
                    "8",
                    "--steps",
                    "2",
                    "--warmup",
                    "1",
                    "--device",
                    "cpu",
                ],
                "train_bench.json",
            ),
            Step("run-clip-b16", 120, ["-m", "vlkit.bench.gpu_check", "--run-pair", "--dry-run"], "run_pair.json"),
        ]
    return [
        Step(
            "fused",
            110,
            [
                "-m",
                "vlkit.bench.fused",
                "--batch-sizes",
                "16384",
                "--dim",
                "512",
                "--dtype",
                "bf16",
                "--no-autotune",
            ],
            "fused_check.json",
        ),
        Step(
            "loss",
            110,
            [
                "-m",
                "vlkit.bench.loss",
                "--batch-sizes",
                "16384,65536,98304,262144",
                "--dims",
                "512",
                "--dtype",
                "bf16",
                "--impls",
                "naive,tiled,fused",
                "--repeats",
                "10",
            ],
            "loss_bench.json",
        ),
        Step(
            "train-clip-b16",
            130,
            [
                "-m",
                "vlkit.bench.train",
                "--model",
                "clip-b16",
                "--batch-size",
                "256",
                "--precision",
                "bf16",
                "--compile",
                "both",
                "--peer-compile",
                "both",
                "--steps",
                "10",
                "--warmup",
                "3",
            ],
            "train_bench.json",
        ),
        Step(
            "train-vit-b16",
            60,
            [
                "-m",
                "vlkit.bench.train",
                "--model",
                "vit-b16",
                "--batch-size",
                "256",
                "--precision",
                "bf16",
                "--compile",
                "on",
                "--steps",
                "10",
                "--warmup",
                "3",
                "model.vision.class_token_length=1",
                "model.vision.hidden_dropout=0",
            ],
            "train_bench.json",
        ),
        Step(
            "train-llama-1b",
            60,
            [
                "-m",
                "vlkit.bench.train",
                "--model",
                "llama-1b",
                "--batch-size",
                "8",
                "--seq-len",
                "2048",
                "--precision",
                "bf16",
                "--steps",
                "10",
                "--warmup",
                "3",
            ],
            "train_bench.json",
        ),
        Step("run-clip-b16", 90, ["-m", "vlkit.bench.gpu_check", "--run-pair"], "run_pair.json"),
    ]


def run_step(step: Step, out: Path, deadline: float) -> dict[str, Any]:
    """Run one step in its own process, within its budget and the call's deadline; its output goes to
    ``out/<name>/log.txt`` and its JSON is read back (None when it wrote none)."""
    folder = out / step.name
    folder.mkdir(parents=True, exist_ok=True)
    timeout = min(step.budget_s, deadline - time.monotonic())
    record: dict[str, Any] = {"name": step.name, "budget_s": step.budget_s, "command": "python " + " ".join(step.argv)}
    if timeout < 10:
        return {**record, "status": "skipped: the call's time is spent"}
    argv = [sys.executable, *step.argv, "--out", str(folder)]
    t0 = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        try:
            proc = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False, env={**os.environ, **step.env}
            )
            record["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            record["status"] = f"timed out after {timeout:.0f} s"
    record["seconds"] = round(time.monotonic() - t0, 1)
    result = folder / step.result if step.result else None
    record["result"] = json.loads(result.read_text()) if result is not None and result.is_file() else None
    if record["status"] != "ok":
        record["log_tail"] = (folder / "log.txt").read_text(errors="replace")[-2000:]
    return record


# -------------------------------------------------------------------------------------------- the training pair


def run_pair(out: Path, dry: bool) -> dict[str, Any]:
    """Step 4: the fast configuration and eager fp32 train the same steps from the same weights and data."""
    from vlkit.config import load_config
    from vlkit.data.shapes import write_shapes_dataset
    from vlkit.parallel import cleanup
    from vlkit.tasks import task_for
    from vlkit.train.trainer import Trainer

    if dry:
        preset, steps_, size, micro = "clip-tiny", 4, 32, 16
        fast = ["trainer.precision=bf16", "model.loss_impl=tiled"]
    else:
        preset, steps_, size, micro = "clip-b16", 50, 224, 64
        fast = ["trainer.precision=bf16", "model.loss_impl=fused", "parallel.compile=true"]
    data = out / "data"
    # One epoch of shards, no held-out split: this step compares training, evaluation is timed elsewhere.
    write_shapes_dataset(data, train=steps_ * micro, val=8, size=size, workers=os.cpu_count(), progress=False)
    common = [
        "data.kind=webdataset",
        f"data.train_path={data / 'train'}",
        "data.val_path=null",
        f"data.dataset_size={steps_ * micro}",
        f"trainer.micro_batch_size={micro}",
        f"trainer.max_steps={steps_}",
        "trainer.logging.log_every_n_steps=1",
        "trainer.logging.tensorboard=false",
        "trainer.save_model=false",
        "schedule.warmup_steps=5",
        "trainer.overwrite=true",
        "data.num_workers=0" if dry else "data.num_workers=8",
    ]
    losses = {}
    for name, extra in (("fast", fast), ("fp32", ["trainer.precision=fp32"])):
        cfg = load_config(preset, [*common, *extra, f"trainer.output_dir={out / name}"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg, task_for(cfg.model.arch))
        history = trainer.fit()
        losses[name] = [h["loss"] for h in history if "loss" in h]
        losses[name + "_seconds"] = time.perf_counter() - t0
        del trainer
    cleanup(wait_for_peers=False)
    tail = slice(-10, None)
    fast_mean = sum(losses["fast"][tail]) / len(losses["fast"][tail])
    ref_mean = sum(losses["fp32"][tail]) / len(losses["fp32"][tail])
    rel = abs(fast_mean - ref_mean) / abs(ref_mean)
    return {
        "preset": preset,
        "steps": steps_,
        "fast": fast,
        "losses": losses,
        "last10_mean_fast": fast_mean,
        "last10_mean_fp32": ref_mean,
        "relative_difference": rel,
        "tolerance": RUN_LOSS_RTOL,
        "pass": rel <= RUN_LOSS_RTOL,
    }


# ---------------------------------------------------------------------------------------------------- the report


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """[what, measured, goal] rows from the steps' JSON."""
    rows = []
    for r in records:
        res, name = r.get("result"), r["name"]
        if res is None:
            rows.append([name, r.get("status", "?"), GOALS.get(name, "")])
            continue
        if name == "fused":
            checks = res.get("checks", [])
            passed = sum(bool(c.get("pass")) for c in checks)
            rows.append(["fused loss correctness", f"{passed}/{len(checks)} checks pass", "all"])
            for b in res.get("bench", []):
                rows.append([f"{b['impl']} B={b['B']}", f"{_fmt(b.get('ms'), '.2f')} ms", ""])
        elif name == "loss":
            for b in res.get("results", []):
                mem = b.get("peak_extra_bytes")
                measured = f"{_fmt(b.get('time_ms'), '.2f')} ms, {_fmt(None if mem is None else mem / 2**20, '.0f')} MB"
                what = f"loss {b['impl']} B={b['batch_size']}"
                rows.append(
                    [
                        what,
                        measured if b.get("status") == "ok" else b.get("status", "?"),
                        GOALS.get(f"loss B={b['batch_size']}", "") if b["impl"] == "fused" else "",
                    ]
                )
        elif name.startswith("train-"):
            for s in res.get("systems", []):
                rate = s.get("tokens_per_s") or s.get("samples_per_s")
                unit = "tokens/s" if s.get("tokens_per_s") else "samples/s"
                ratios = ", ".join(f"{v:.2f}x {k}" for k, v in (s.get("ratio_vs") or {}).items())
                measured = f"{_fmt(rate, '.1f')} {unit}, MFU {_fmt(s.get('mfu'), '.2f')}" + (
                    f" ({ratios})" if ratios else ""
                )
                goal = GOALS.get(name, "") if s.get("kind") == "vlkit" else ""
                rows.append(
                    [f"{name} {s.get('system')}", measured if s.get("status") == "ok" else s.get("status"), goal]
                )
        elif name.startswith("run-"):
            verdict = "agree" if res.get("pass") else "DIFFER"
            rows.append(
                [
                    f"{res['preset']} {res['steps']} steps, fast vs fp32",
                    f"last-10 mean loss {res['last10_mean_fast']:.4f} vs {res['last10_mean_fp32']:.4f}: {verdict}",
                    f"within {res['tolerance']:.0%}",
                ]
            )
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| what | measured | goal (BENCHMARKS.md) |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlkit.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="result folder (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: rehearse the call")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole sequence (default 520)")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    p.add_argument("--run-pair", action="store_true", help=argparse.SUPPRESS)  # step 4, run as its own process
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run_pair:
        result = run_pair(out, args.dry_run)
        (out / "run_pair.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["pass"] else 1
    deadline = time.monotonic() + args.budget
    chosen = steps(args.dry_run)
    if args.only:
        wanted = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in wanted]
    report: dict[str, Any] = {"environment": environment(), "dry_run": args.dry_run, "steps": []}
    for step in chosen:
        print(f"gpu-check: {step.name} (budget {step.budget_s:.0f} s) ...", flush=True)
        record = run_step(step, out, deadline)
        print(f"gpu-check: {step.name}: {record['status']} in {record.get('seconds', 0)} s", flush=True)
        report["steps"].append(record)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["table"] = markdown(summary_rows(report["steps"]))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(report["table"])
    return 0 if all(r["status"] == "ok" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
