"""Training-step throughput and MFU of vlkit's trainer against open_clip / timm on the same architecture, in one run.

What is timed, per system, is one optimizer step on a fixed random batch that already lives on the device (no data
loading):

- ``vlkit``: ``Trainer.train_step`` itself — the model wrapped by ``vlkit.parallel.parallelize`` from the preset
  (per-block ``torch.compile`` with ``--compile``, FSDP2 mixed precision with ``--precision O2``), forward under
  bf16 autocast, the task's loss (CLIP: ``ContrastiveLoss`` with ``--loss-impl``), backward, the non-finite check,
  the optimizer from ``build_optimizer`` (fused AdamW on CUDA), the logit-scale clamp, ``zero_grad`` and the
  schedule. Its host syncs (loss value, finiteness) are part of what the trainer does, so they are timed too.
- ``open_clip``: the step of its own training loop — autocast forward, ``ClipLoss``, backward, fused AdamW,
  ``zero_grad(set_to_none=True)``, logit-scale clamp — on a model built by ``open_clip.create_model`` with the vlkit
  preset's architecture (the named config when one matches exactly, e.g. ``ViT-B-16`` for clip-b16).
- ``timm``: ``vit_base_patch16_224`` (or a ``VisionTransformer`` with the preset's dimensions), cross-entropy,
  fused AdamW — as ``anchors/anchor_models.py`` measured it.
- ``+compile``: the peer under whole-model ``torch.compile``, as the anchors' "peer + torch.compile".

The figure is the median step time over ``--steps`` steps after ``--warmup`` untimed ones (CUDA events on a GPU,
``perf_counter`` on the CPU). FLOPs per step are counted once per system by ``FlopCounterMode`` for one forward +
loss + backward of that system's model at the benchmark batch, traced on the meta device (same shapes, so the
same count as on the GPU; attention is counted on every device, which the CPU kernels would hide), with the same
loss formula for every CLIP system (open_clip's two logit matmuls). MFU divides the achieved FLOP/s by the
device's dense bf16 peak (``vlkit.train.metrics``: 790 TFLOP/s for H100/H200, the ceiling measured in
BENCHMARKS.md) or ``--peak-tflops``; with no known peak (the CPU) it is omitted.

LLaMA presets run against transformers' ``LlamaForCausalLM`` built from the same config, in pure bf16 as the anchors
ran it, on ``--batch-size`` sequences of ``--seq-len`` token ids (default 8 x 2048), and report tokens/s.

Inputs: images ``randn [B, 3, H, W]`` (float32, as the anchors); token ids uniformly random in
``[1, eot)`` over the full context with the end-of-text token at the last position, so every system runs all
positions (the anchors' open_clip always does; vlkit's padding trim then has nothing to trim); labels uniform.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.bench import peers
from vlkit.bench.common import fmt, format_columns, is_oom, machine_info, ratio
from vlkit.bench.systems import System, count_step_flops, next_token_loss

PRECISIONS = ("bf16", "fp32", "O2")
LOSS_IMPLS = ("auto", "naive", "tiled", "fused")
PEERS_BY_ARCH = {"clip": ("open_clip",), "vit_classifier": ("timm",), "llama": ("transformers",)}
DEFAULT_BATCH = {"llama": 8}  # sequences per step for decoders (the anchors' 8 x 2048 tokens); 256 samples otherwise
DEFAULT_SEQ_LEN = 2048
# --compile: which vlkit variants run. "static" turns off dynamo's automatic dynamic shapes, so the towers' blocks
# (one code object, two shapes) get one static graph each instead of a shape-generic one for the second tower.
VLKIT_COMPILE = {
    "off": ("eager",),
    "on": ("compile",),
    "static": ("compile-static",),
    "both": ("eager", "compile"),
    "all": ("eager", "compile", "compile-static"),
}
PEER_DISTRIBUTIONS = ("open_clip_torch", "timm", "transformers")  # versions recorded with the machine
PEER_COMPILE = {"off": ("eager",), "on": ("compile",), "both": ("eager", "compile")}
INPUTS_NOTE = (
    "images randn [B,3,H,W] float32; token ids uniform in [1, eot) over the full context with eot at the last "
    "position (every system runs all positions); labels uniform in [0, num_classes); LLaMA: ids uniform in "
    "[0, vocab) of [B, seq_len], every next token a target"
)


# --------------------------------------------------------------------------------------------------------------------
# Inputs and FLOP counting


def make_inputs(
    model_cfg, batch: int, device: torch.device, seed: int = 0, seq_len: int = DEFAULT_SEQ_LEN
) -> dict[str, torch.Tensor]:
    """The one random batch every system trains on (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if model_cfg.arch == "llama":  # token ids uniform over the vocabulary, every position a target
        ids = torch.randint(0, model_cfg.llm.vocab_size, (batch, seq_len), generator=g)
        return {"input_ids": ids.to(device)}
    v = model_cfg.vision
    out = {"image": torch.randn(batch, v.num_channels, v.img_h, v.img_w, generator=g)}
    if model_cfg.arch == "clip":
        t = model_cfg.text
        eot = t.eot_token_id
        ids = torch.randint(1, eot, (batch, t.encoder_seq_length), generator=g)
        ids[:, -1] = eot
        out["text"] = ids
    else:
        out["label"] = torch.randint(0, model_cfg.num_classes, (batch,), generator=g)
    return {k: x.to(device) for k, x in out.items()}


def _count_params(model: nn.Module) -> int:
    from vlkit.utils.flops import count_parameters

    return count_parameters(model)


# --------------------------------------------------------------------------------------------------------------------
# vlkit: the trainer's own step


def _bench_task(arch: str):
    """The trainer's task for ``arch`` with a data loader that yields nothing (the batch is handed in directly)."""
    from vlkit.models import create_model
    from vlkit.tasks.base import Task

    if arch == "clip":
        from vlkit.tasks.clip import CLIPTask

        class BenchCLIPTask(CLIPTask):
            def build_train_loader(self, micro_batch_size: int):
                return []

        return BenchCLIPTask

    class BenchTask(Task):
        def build_model(self) -> nn.Module:
            return create_model(self.cfg)

        def build_train_loader(self, micro_batch_size: int):
            return []

    if arch == "vit_classifier":

        class BenchClassifyTask(BenchTask):
            """The classify task's step (cross-entropy on logits) without its data, augmentation and mixup."""

            name = "classify"

            def loss(self, model, batch):
                return F.cross_entropy(model(batch["image"]).float(), batch["label"]), {}

            def train_flops(self, batch) -> int | None:
                from vlkit.utils.flops import tower_flops

                meta = create_model(self.cfg, device="meta")
                return self.batch_size(batch) * tower_flops(meta)["image"].forward_backward

        return BenchClassifyTask
    if arch == "llama":

        class BenchCausalLMTask(BenchTask):
            """Next-token cross-entropy on every position of the batch's sequences."""

            name = "causal_lm"

            def batch_size(self, batch) -> int:
                return int(batch["input_ids"].shape[0])

            def loss(self, model, batch):
                return next_token_loss(model(batch["input_ids"]), batch["input_ids"]), {}

            def train_flops(self, batch) -> int | None:
                return count_step_flops(create_model(self.cfg, device="meta"), "llama", batch)

        return BenchCausalLMTask
    raise ValueError(f"vlkit bench train supports CLIP, ViT-classifier and LLaMA presets, not model.arch={arch!r}")


def resolved_loss_impl(impl: str, device: torch.device) -> str:
    """What ``impl="auto"`` runs on one process (the CLIP task has no group of size > 1 here)."""
    if impl != "auto":
        return impl
    from vlkit.losses.contrastive import fused_status

    return "fused" if fused_status(device)[0] else "tiled"


def vlkit_overrides(args: argparse.Namespace, device: torch.device, compiled: bool, out_dir: str) -> list[str]:
    o2 = args.precision == "O2"
    ov = list(args.overrides) + [
        f"trainer.micro_batch_size={args.batch_size}",
        "trainer.global_batch_size=null",
        f"trainer.precision={'fp32' if args.precision == 'fp32' else 'bf16'}",
        f"trainer.amp_O2={str(o2).lower()}",
        f"trainer.max_steps={args.warmup + args.steps + 1}",
        f"trainer.accelerator={device.type}",
        f"trainer.output_dir={out_dir}",
        f"parallel.compile={str(compiled).lower()}",
        "trainer.logging.tensorboard=false",
        "trainer.logging.jsonl=false",
    ]
    if args.loss_impl is not None:
        ov.append(f"model.loss_impl={args.loss_impl}")
    return ov


def build_vlkit(args: argparse.Namespace, device: torch.device, compiled: bool, inputs: dict) -> System:
    import torch.distributed as dist

    import vlkit
    from vlkit.config import load_config
    from vlkit.models import create_model
    from vlkit.train.trainer import Trainer

    out_dir = tempfile.mkdtemp(prefix="vlkit-bench-train-")
    had_group = dist.is_available() and dist.is_initialized()

    def release():
        shutil.rmtree(out_dir, ignore_errors=True)
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the one-process group that O2 (FSDP) made the trainer create

    try:
        cfg = load_config(args.model, vlkit_overrides(args, device, compiled, out_dir))
        meta = create_model(cfg, device="meta")
        params, flops = _count_params(meta), count_step_flops(meta, cfg.model.arch, inputs)
        del meta
        trainer = Trainer(cfg, _bench_task(cfg.model.arch))
    except BaseException:
        release()
        raise
    batch = dict(inputs)
    state: dict[str, Any] = {}

    def step():
        state["metrics"] = trainer.train_step([batch])

    def close():
        nonlocal trainer
        trainer = None
        release()

    plan = trainer.plan
    notes, extra = [], {"parallel_plan": _plan_dict(plan), "last_step": state}
    if cfg.model.arch == "clip":
        impl = resolved_loss_impl(cfg.model.loss_impl, device)
        extra["loss_impl"] = {"requested": cfg.model.loss_impl, "resolved": impl}
    try:
        extra["trainer_flops_per_step"] = trainer.task.train_flops(batch)
    except Exception as e:  # the cross-check is informative only
        notes.append(f"trainer FLOP count failed: {type(e).__name__}: {e}")
    precision = "O2 (bf16 params, fp32 master via FSDP2)" if args.precision == "O2" else args.precision
    what = "Trainer.train_step" + (" + per-block torch.compile" if compiled else "")
    source = f"vlkit {vlkit.__version__} {what}, preset {args.model}" + (
        f" with {' '.join(args.overrides)}" if args.overrides else ""
    )
    return System(
        source=source,
        step=step,
        precision=precision,
        params=params,
        flops_per_step=flops,
        notes=notes,
        extra=extra,
        close=close,
    )


def _plan_dict(plan) -> dict[str, Any]:
    return {
        "data_parallel": plan.data_parallel,
        "compiled": plan.compiled,
        "activation_checkpointing": list(plan.activation_checkpointing),
        "autocast_dtype": str(plan.autocast_dtype).replace("torch.", "") if plan.autocast_dtype else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Per-step times (ms) after ``warmup`` untimed steps, and the peak memory of the timed steps."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        t0 = time.perf_counter()
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
        peak = None
    return {"times_ms": times, "wall_ms_per_step": wall * 1e3 / steps, "warmup_s": warmup_s, "peak_mem_gib": peak}


def measure(system: System, device: torch.device, args: argparse.Namespace, peak_flops: float | None) -> dict:
    t = time_steps(system.step, device, args.warmup, args.steps)
    median_ms = statistics.median(t["times_ms"])
    achieved = system.flops_per_step / (median_ms * 1e-3)
    row = {
        "step_ms": median_ms,
        "step_ms_mean": statistics.fmean(t["times_ms"]),
        "step_ms_min": min(t["times_ms"]),
        "step_ms_max": max(t["times_ms"]),
        "wall_ms_per_step": t["wall_ms_per_step"],
        "times_ms": t["times_ms"],
        "warmup_s": t["warmup_s"],
        "samples_per_s": args.batch_size / (median_ms * 1e-3),
        "tokens_per_s": args.batch_size * args.seq_len / (median_ms * 1e-3) if args.seq_len else None,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
        "peak_mem_gib": t["peak_mem_gib"],
    }
    return row


# --------------------------------------------------------------------------------------------------------------------
# Report


def add_ratios(rows: list[dict]) -> list[str]:
    """``ratio_vs[peer system]`` = this row's samples/s over the peer's; returns the peer columns in order."""
    peers = [r for r in rows if r["kind"] == "peer" and r.get("samples_per_s")]
    for r in rows:
        r["ratio_vs"] = {p["system"]: ratio(r.get("samples_per_s"), p["samples_per_s"]) for p in peers}
        r["ratio_vs"] = {k: v for k, v in r["ratio_vs"].items() if v is not None}
    return [p["system"] for p in peers]


def format_table(rows: list[dict], peer_cols: list[str], title: str) -> str:
    tokens = any(r.get("tokens_per_s") for r in rows)
    rate = "tokens/s" if tokens else "samples/s"
    head = ["system", rate, "ms/step", "TFLOP/s", "MFU", "peak GiB"] + [f"vs {p}" for p in peer_cols]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["system"], r["status"]] + [""] * (len(head) - 2))
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        cells = [
            r["system"],
            fmt(r["tokens_per_s"] if tokens else r["samples_per_s"], ".1f"),
            fmt(r["step_ms"], ".2f"),
            fmt(r["achieved_tflops"], ".3g"),
            "-" if mfu is None else f"{mfu:.1f}%",
            fmt(r["peak_mem_gib"], ".2f"),
        ]
        cells += [fmt(r["ratio_vs"].get(p), ".2f") + "x" if p in r["ratio_vs"] else "-" for p in peer_cols]
        lines.append(cells)
    return "\n".join([title, *format_columns(head, lines)])


def equivalent_command(args: argparse.Namespace, device: torch.device, peers: list[str]) -> str:
    # sys.argv is unhelpful when run() is called from Python; this line reproduces the run from a shell.
    parts = [
        "vlkit bench train",
        f"--model {args.model}",
        f"--batch-size {args.batch_size}",
        *([f"--seq-len {args.seq_len}"] if args.seq_len else []),
        f"--steps {args.steps}",
        f"--warmup {args.warmup}",
        f"--precision {args.precision}",
        f"--compile {args.compile}",
        f"--peers {','.join(peers) or 'none'}",
        f"--peer-compile {args.peer_compile}",
        f"--device {device}",
    ]
    if args.loss_impl is not None:
        parts.append(f"--loss-impl {args.loss_impl}")
    if args.peak_tflops:
        parts.append(f"--peak-tflops {args.peak_tflops:g}")
    if args.json:
        parts.append("--json")
    if args.out is not None:
        parts.append(f"--out {args.out}")
    return " ".join(parts + list(args.overrides))


def checks(rows: list[dict]) -> dict[str, Any]:
    """Same network, same count: relative FLOP and parameter differences between vlkit and each peer."""
    ours = next((r for r in rows if r["kind"] == "vlkit" and r.get("flops_per_step")), None)
    out: dict[str, Any] = {}
    if ours is None:
        return out
    for r in rows:
        if r["kind"] != "peer" or not r.get("flops_per_step") or r["peer"] in out:
            continue
        out[r["peer"]] = {
            "architecture_issues": r.get("architecture_issues", []),
            "params_vlkit": ours["params"],
            "params_peer": r["params"],
            "flops_rel_diff": r["flops_per_step"] / ours["flops_per_step"] - 1,
            "same_network": not r.get("architecture_issues") and r["params"] == ours["params"],
        }
    tf = ours.get("trainer_flops_per_step")
    if tf:
        # The trainer's logged MFU counts the towers without the loss; it should agree with this count.
        out["trainer_mfu_basis_rel_diff"] = tf / ours["flops_per_step"] - 1
    return out


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vlkit bench train``."""
    parser.description = (
        "Time vlkit's training step (Trainer.train_step: forward, loss, backward, optimizer) and the peers' on the "
        "same architecture and the same random on-device batch; report samples/s, step time, TFLOP/s, MFU and peak "
        "memory side by side, as ratios."
    )
    parser.epilog = (
        "examples:\n"
        "  vlkit bench train --model clip-b16 --batch-size 256 --precision bf16 --compile both --peer-compile "
        "--out $OUT\n"
        "  vlkit bench train --model vit-b16 --peers timm --peer-compile\n"
        "  vlkit bench train --model clip-tiny --batch-size 8 --steps 2 --warmup 1 --device cpu\n"
        "  vlkit bench train --model llama-1b --batch-size 8 --seq-len 2048   # tokens/s against transformers"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the vlkit preset")
    parser.add_argument(
        "--model", default="clip-b16", help="vlkit preset (CLIP, ViT classifier or LLaMA), default clip-b16"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples (sequences for LLaMA) per step (default 256; LLaMA 8)"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"LLaMA: tokens per sequence (default {DEFAULT_SEQ_LEN}, at most the context)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per system (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1; compilation happens here)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16 autocast (default), fp32, or O2")
    parser.add_argument(
        "--compile",
        choices=list(VLKIT_COMPILE),
        nargs="?",
        const="on",
        default="off",
        help="vlkit per-block torch.compile: off (default), on (bare --compile), both (eager and compiled), static "
        "(compiled without automatic dynamic shapes), all (eager, compiled, static)",
    )
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, default=None, help="vlkit CLIP loss (default: preset's)")
    parser.add_argument(
        "--peers",
        default=None,
        help="comma-separated peers (open_clip for CLIP, timm for ViT classifiers, transformers for LLaMA) or "
        "'none'; default: the "
        "importable ones of the model's family",
    )
    parser.add_argument(
        "--peer-compile",
        choices=list(PEER_COMPILE),
        nargs="?",
        const="both",
        default="off",
        help="peers under torch.compile: off (default), both (bare --peer-compile: eager and compiled), on",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout (progress on stderr)")
    parser.add_argument("--out", type=Path, default=None, help="directory for train_bench.json (written as it goes)")


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as e:  # a broken install is as unusable as a missing one
        return False, f"{type(e).__name__}: {e}"


def _resolve_peers(spec: str | None, arch: str) -> tuple[list[str], list[dict], str | None]:
    """(peers to run, skipped with reasons, usage error)."""
    family = PEERS_BY_ARCH.get(arch, ())
    if spec is None:
        run, skipped = [], []
        for p in family:
            ok, why = _importable(peers.PEER_MODULES[p])
            if ok:
                run.append(p)
            else:
                skipped.append({"peer": p, "reason": f"not importable ({why})"})
        return run, skipped, None
    names = [] if spec.strip() == "none" else [s.strip() for s in spec.split(",") if s.strip()]
    for p in names:
        if p not in peers.PEER_BUILDERS:
            return [], [], f"unknown peer {p!r} (choose from {', '.join(peers.PEER_BUILDERS)}, or none)"
        if p not in family:
            return [], [], f"peer {p!r} does not train model.arch={arch!r} (its peers: {', '.join(family) or 'none'})"
        ok, why = _importable(peers.PEER_MODULES[p])
        if not ok:
            hint = {"open_clip": "open_clip_torch==3.3.0"}.get(p, p)
            return [], [], f"peer {p!r} was asked for but cannot be imported ({why}); pip install {hint}"
    return names, [], None


def _device(spec: str | None) -> torch.device | str:
    try:
        device = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        return f"bad --device: {e}"
    if device.type not in ("cuda", "cpu"):
        return f"--device must be cuda or cpu, got {device}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda requested but CUDA is not available"
        if device.index not in (None, 0):
            return "the trainer runs on the process's first GPU: select another with CUDA_VISIBLE_DEVICES instead"
        device = torch.device("cuda", 0)
    return device


def _plan(args: argparse.Namespace, peers: list[str]) -> list[tuple[str, str]]:
    """(system, mode) in run order: eager systems first, so that a slow compilation cannot cost the eager figures
    when a time limit cuts the run short."""
    order = []
    for mode in ("eager", "compile", "compile-static"):
        if mode in VLKIT_COMPILE[args.compile]:
            order.append(("vlkit", mode))
        order += [(p, mode) for p in peers if mode in PEER_COMPILE[args.peer_compile]]
    return order


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit code (2: bad usage, 1: a system failed, 0: all measured)."""
    from vlkit.config import ConfigError, load_config
    from vlkit.train.metrics import device_peak_flops

    log = sys.stderr if args.json else sys.stdout
    if args.steps < 1 or args.warmup < 1 or (args.batch_size or 1) < 1 or (args.seq_len or 2) < 2:
        print("error: --steps, --warmup and --batch-size must be >= 1, --seq-len >= 2", file=sys.stderr)
        return 2
    device = _device(args.device)
    if isinstance(device, str):
        print(f"error: {device}", file=sys.stderr)
        return 2
    try:
        model_cfg = load_config(args.model, list(args.overrides)).model
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model_cfg.arch not in PEERS_BY_ARCH:
        print(f"error: vlkit bench train times CLIP, ViT-classifier and LLaMA presets, not model.arch="
              f"{model_cfg.arch!r}", file=sys.stderr)  # fmt: skip
        return 2
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH.get(model_cfg.arch, 256)
    if model_cfg.arch == "llama":
        context = model_cfg.llm.encoder_seq_length
        args.seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, context)
        if args.seq_len > context:
            print(f"error: --seq-len {args.seq_len} is longer than the model's context ({context})", file=sys.stderr)
            return 2
    elif args.seq_len is not None:
        print("error: --seq-len applies to LLaMA presets only", file=sys.stderr)
        return 2
    peers, skipped, error = _resolve_peers(args.peers, model_cfg.arch)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        # As the anchors ran: TF32 for the float32 matmuls left under autocast (and for --precision fp32).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_flops = device_peak_flops(device, args.peak_tflops)
    notes = [f"inputs: {INPUTS_NOTE}"]
    if peak_flops is None:
        notes.append(f"MFU omitted: no known bf16 peak for {device} (pass --peak-tflops)")
    if model_cfg.arch != "clip" and args.loss_impl is not None:
        notes.append("--loss-impl applies to CLIP only; ignored")
        args.loss_impl = None
    for s in skipped:
        notes.append(f"peer {s['peer']} skipped: {s['reason']}")
    torch.manual_seed(0)
    inputs = make_inputs(model_cfg, args.batch_size, device, seq_len=args.seq_len or DEFAULT_SEQ_LEN)
    report: dict[str, Any] = {
        "benchmark": "training step throughput, one device, random on-device data",
        "command": equivalent_command(args, device, peers),
        "argv": list(sys.argv),
        "machine": machine_info(device, PEER_DISTRIBUTIONS),
        "settings": {
            "model": args.model,
            "overrides": list(args.overrides),
            "arch": model_cfg.arch,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "precision": args.precision,
            "compile": args.compile,
            "loss_impl": args.loss_impl,
            "peers": peers,
            "peer_compile": args.peer_compile,
            "inputs": INPUTS_NOTE,
            "timing": "median of per-step times; " + ("CUDA events" if device.type == "cuda" else "perf_counter"),
            "flops": "FlopCounterMode, one forward + loss + backward at the batch, traced on the meta device",
            "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
            "peak_mem": "torch.cuda.max_memory_allocated over the timed steps, GiB" if device.type == "cuda" else None,
        },
        "systems": [],
        "notes": notes,
    }
    print(f"vlkit bench train: {args.model}, batch {args.batch_size}, {args.precision}, on {device}", file=log)
    for n in notes:
        print(f"note: {n}", file=log)
    failed = False
    for which, mode in _plan(args, peers):
        row = run_system(which, mode, args, model_cfg, device, inputs, peak_flops, log)
        failed |= row["status"] != "ok"
        report["systems"].append(row)
        _write(report, args.out)
    peer_cols = add_ratios(report["systems"])
    report["checks"] = checks(report["systems"])
    title = (
        f"vlkit bench train: {args.model}, batch {args.batch_size}, {args.precision}, {args.steps} steps after "
        f"{args.warmup} warm-up, {report['machine'].get('gpu', device)}"
    )
    report["table"] = format_table(report["systems"], peer_cols, title)
    _write(report, args.out)
    if args.out is not None:
        print(f"wrote {args.out / 'train_bench.json'}", file=log)
    print(report["table"], file=log, flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


def run_system(
    which: str, mode: str, args, model_cfg, device: torch.device, inputs: dict, peak_flops: float | None, log
) -> dict[str, Any]:
    """Build, time and release one system; failures are recorded in the row, not raised."""
    from torch._dynamo.utils import counters

    compiled = mode != "eager"
    label = which if mode == "eager" else f"{which}+{mode}"
    row: dict[str, Any] = {"system": label, "kind": "vlkit" if which == "vlkit" else "peer",
                           "peer": None if which == "vlkit" else which, "compiled": compiled}  # fmt: skip
    _free(device)
    row["mem_before_gib"] = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"[{label}] building ...", file=log, flush=True)
    counters.clear()
    static = torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    system = None
    try:
        with static if mode == "compile-static" else contextlib.nullcontext():
            if which == "vlkit":
                system = build_vlkit(args, device, compiled, inputs)
            else:
                system = peers.PEER_BUILDERS[which](model_cfg, args, device, compiled, inputs)
            if mode == "compile-static":
                system.source += ", automatic dynamic shapes off"
            row.update(source=system.source, precision=system.precision, params=system.params,
                       flops_per_step=system.flops_per_step)  # fmt: skip
            print(f"[{label}] {system.source}; {system.flops_per_step / 1e12:.4g} TFLOP/step; timing ...",
                  file=log, flush=True)  # fmt: skip
            row.update(measure(system, device, args, peak_flops))
        row["status"] = "ok"
    except Exception as e:
        row["status"] = "oom" if is_oom(e) else "error"
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"[{label}] {row['status']}: {row['error']}", file=log, flush=True)
    finally:
        if system is not None:
            row["notes"] = list(system.notes)
            row.update(system.extra)
            system.close()
        del system
        if compiled:
            # How many graphs the compiler made (one per tower's block shape is the ideal) and where it gave up.
            row["dynamo"] = {
                "unique_graphs": int(counters["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(counters["graph_break"].values())),
            }
            torch._dynamo.reset()  # drop this system's graphs before the next one compiles
    last = row.pop("last_step", {}).get("metrics")
    if last is not None:
        row["nonfinite_steps"] = last.get("nonfinite_steps", 0)
        if row["nonfinite_steps"]:
            row["notes"].append(
                f"{row['nonfinite_steps']} steps skipped as non-finite: the optimizer step was not timed"
            )
    if row["status"] == "ok":
        rate = (
            f"{row['tokens_per_s']:.1f} tokens/s"
            if row.get("tokens_per_s")
            else f"{row['samples_per_s']:.1f} samples/s"
        )
        print(f"[{label}] {rate}, {row['step_ms']:.2f} ms/step", file=log, flush=True)
    return row


def _write(report: dict, out: Path | None) -> None:
    # Written after every system, so a run cut short by a time limit still leaves what it measured.
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train_bench.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out / "train_bench.json")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m vlkit.bench.train ...``."""
    parser = argparse.ArgumentParser(prog="vlkit bench train")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
