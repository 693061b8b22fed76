"""``vlkit bench loss``: forward + backward time and peak extra memory of the contrastive losses and their peers.

For every (dim, batch size) the candidates share one set of unit-norm features and are timed round-robin
(a different starting candidate each round), so that drifting machine load affects all of them alike;
the figure is the median. GPU times come from CUDA events, CPU times from ``perf_counter``.

Peak extra memory is the peak beyond the input features and their gradients:

- CUDA: ``torch.cuda.max_memory_allocated()`` during one forward + backward, minus the memory held
  after it (inputs, gradients and anything the candidate keeps).
- CPU: the caching-free CPU allocator hands memory back to the OS, so the resident set is the honest
  measure, but a process that has already run other candidates keeps freed pages and would hide part
  of the next peak. Each (candidate, batch, dim) therefore runs once in a fresh ``spawn`` process:
  after building the inputs it resets the kernel's high-water mark (``/proc/self/clear_refs``),
  runs one forward + backward, and reports ``VmHWM`` minus the resident set before the run minus
  the gradient bytes. There is no warm-up in that process, so one-time buffers (thread pools, BLAS
  workspace) count against the candidate: an over- rather than an under-estimate.

Achieved TFLOP/s use the exact loss's floor of ``8 * B^2 * D`` FLOPs for forward + backward.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vlkit.bench.common import fmt, format_columns, is_oom, machine_info, ratio

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OURS = ("naive", "tiled", "fused")
PEERS = ("open_clip", "inf_cl")
ALL = OURS + PEERS
DEFAULT_SCALE = 1 / 0.07


# --------------------------------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    name: str
    kind: str  # "vlkit" or "peer"
    source: str  # what exactly runs, for the record
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _openclip_style(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # What open_clip's ClipLoss computes on one process: full logits in the features' dtype, two cross-entropies.
    logits = scale * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _ensure_single_process_group(device: torch.device) -> None:
    # inf_cl all-reduces the scale gradient, so it needs a process group even on one device.
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def make_candidate(name: str, device: torch.device, dtype: torch.dtype) -> Candidate | str:
    """The candidate ``name`` for this device and dtype, or the reason it cannot run."""
    from vlkit.losses import contrastive_loss, fused_status, naive_contrastive_loss, tiled_contrastive_loss

    if name == "naive":
        return Candidate(name, "vlkit", "vlkit naive (full logits, fp32 math)", naive_contrastive_loss)
    if name == "tiled":
        return Candidate(name, "vlkit", "vlkit tiled (pure PyTorch, recomputed tiles)", tiled_contrastive_loss)
    if name == "fused":
        ok, reason = fused_status(device)
        if not ok:
            return reason
        return Candidate(name, "vlkit", "vlkit fused (Triton)", lambda x, y, s: contrastive_loss(x, y, s, impl="fused"))
    if name == "open_clip":
        try:
            import open_clip
            from open_clip.loss import ClipLoss
        except Exception:
            return Candidate(name, "peer", "open_clip-style naive loss (inline)", _openclip_style)
        loss = ClipLoss()
        version = getattr(open_clip, "__version__", "?")
        return Candidate(name, "peer", f"open_clip {version} ClipLoss", lambda x, y, s: loss(x, y, s))
    if name == "inf_cl":
        try:
            import inf_cl
            from inf_cl import cal_inf_loss
        except Exception as e:
            return f"inf_cl is not importable ({type(e).__name__})"
        if device.type != "cuda":
            return "inf_cl runs Triton kernels on CUDA only"
        if dtype != torch.float32:
            return "inf_cl accepts fp32 features only"
        _ensure_single_process_group(device)
        version = getattr(inf_cl, "__version__", "?")

        def both_directions(x, y, s):
            # cal_inf_loss is one direction (rows of its first argument); the CLIP loss averages both.
            return (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)) / 2

        return Candidate(name, "peer", f"inf_cl {version} cal_inf_loss, both directions", both_directions)
    return f"unknown impl {name!r} (choose from {', '.join(ALL)})"


def make_inputs(batch: int, dim: int, dtype: torch.dtype, device: torch.device, scale: float, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed + batch * 7 + dim)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(scale, device=device, requires_grad=True)
    return x, y, s


def _step(cand: Candidate, x, y, s) -> float:
    x.grad = y.grad = s.grad = None
    loss = cand.fn(x, y, s)
    loss.backward()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------------------------
# Timing


def _time_once(cand: Candidate, x, y, s, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(cand, x, y, s)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    _step(cand, x, y, s)
    return (time.perf_counter() - t0) * 1e3


def time_candidates(cands: list[Candidate], batch, dim, dtype, device, scale, repeats, warmup) -> dict[str, dict]:
    """Median forward + backward milliseconds of every candidate, interleaved round-robin."""
    x, y, s = make_inputs(batch, dim, dtype, device, scale)
    out: dict[str, dict] = {}
    live = []
    for cand in cands:
        try:
            # The first run doubles as a check that the candidate works at this size.
            for _ in range(max(1, warmup)):
                loss = _step(cand, x, y, s)
            if not math.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss}")
            live.append(cand)
            out[cand.name] = {"times_ms": []}
        except Exception as e:
            out[cand.name] = {"status": "oom" if is_oom(e) else f"error: {type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for cand in order:
            out[cand.name]["times_ms"].append(_time_once(cand, x, y, s, device))
    for cand in live:
        times = out[cand.name]["times_ms"]
        out[cand.name].update(status="ok", time_ms=statistics.median(times) if times else None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Memory


def _cuda_peak_extra(cand: Candidate, batch, dim, dtype, device, scale) -> int:
    x, y, s = make_inputs(batch, dim, dtype, device, scale)
    x.grad = y.grad = s.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    loss = cand.fn(x, y, s)
    loss.backward()
    del loss
    torch.cuda.synchronize(device)
    # Held afterwards: inputs, their gradients, and whatever the candidate caches; the excess is transient.
    return int(torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device))


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_memory_child(conn, name: str, batch: int, dim: int, dtype_name: str, scale: float, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        dtype = DTYPES[dtype_name]
        cand = make_candidate(name, torch.device("cpu"), dtype)
        if isinstance(cand, str):
            conn.send({"error": cand})
            return
        x, y, s = make_inputs(batch, dim, dtype, torch.device("cpu"), scale)
        rss_before = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM, the peak resident set size
            method = "VmHWM after clear_refs"
        except OSError:
            method = "VmHWM since process start"
        _step(cand, x, y, s)
        peak = _proc_status_kib("VmHWM")
        if rss_before is None or peak is None:
            conn.send({"error": "needs /proc/self/status (Linux)"})
            return
        grad_bytes = x.grad.numel() * x.grad.element_size() + y.grad.numel() * y.grad.element_size()
        conn.send({"peak_extra_bytes": max(0, (peak - rss_before) * 1024 - grad_bytes), "method": method})
    except BaseException as e:  # the parent must hear about any failure
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _cpu_peak_extra(name, batch, dim, dtype_name, scale, timeout) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_cpu_memory_child, args=(child, name, batch, dim, dtype_name, scale, torch.get_num_threads())
    )
    proc.start()
    child.close()
    result = None
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"error": f"timed out after {timeout:g} s"}
    if result is None:
        return {"error": f"memory probe exited with code {proc.exitcode} (killed for memory?)"}
    return result


# --------------------------------------------------------------------------------------------------------------------
# Report


def format_table(results: list[dict], baseline: str | None) -> str:
    base = baseline or "-"
    head = ["B", "D", "impl", "time ms", "TFLOP/s", "extra MB", f"speed vs {base}", f"memory vs {base}", "status"]
    rows = []
    for r in results:
        speed = fmt(r.get("speed_vs_baseline"), ".2f") + "x" if r.get("speed_vs_baseline") else "-"
        extra = r.get("peak_extra_bytes")
        rows.append(
            [
                r["batch_size"],
                r["dim"],
                r["impl"],
                fmt(r.get("time_ms"), ".1f"),
                fmt(r.get("tflops"), ".3f"),
                fmt(None if extra is None else extra / 2**20, ".1f"),
                speed,
                fmt(r.get("memory_vs_baseline"), ".4f"),
                r["status"],
            ]
        )
    return "\n".join(format_columns(head, rows, left=(2, 8), rule=True))


def _plot(results: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"no plot: matplotlib unavailable ({type(e).__name__})"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        series.setdefault((r["impl"], r["dim"]), []).append(r)
    for (impl, dim), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["batch_size"])
        label = f"{impl} (D={dim})"
        pts = [(r["batch_size"], r["time_ms"]) for r in rows if r.get("time_ms")]
        if pts:
            ax_t.plot(*zip(*pts), marker="o", label=label)
        pts = [(r["batch_size"], r["peak_extra_bytes"] / 2**20) for r in rows if r.get("peak_extra_bytes")]
        if pts:
            ax_m.plot(*zip(*pts), marker="o", label=label)
    for ax, ylabel in ((ax_t, "forward + backward (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle("Contrastive loss, forward + backward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Command


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown impl(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vlkit bench loss``."""
    parser.description = (
        "Time forward + backward and measure peak extra memory of the contrastive loss implementations "
        "(naive, tiled, fused) and the peers (open_clip's ClipLoss, inf_cl) in one run."
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=[1024, 4096, 8192], help="default 1024,4096,8192")
    parser.add_argument("--dims", type=_int_list, default=[512], help="feature dims, default 512")
    parser.add_argument(
        "--impls",
        type=_name_list,
        default=None,
        help=f"comma-separated subset of {','.join(ALL)}; default: every one available on the device",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="feature dtype (default fp32)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per config (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per candidate before timing (>= 1)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="logit scale (default 1/0.07)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-timeout", type=float, default=900.0, help="seconds per CPU memory probe")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    parser.add_argument("--out", type=Path, default=None, help="directory for loss_bench.json and loss_bench.png")


def _naive_fits_cpu(batch: int) -> bool:
    # The full-logit losses hold a few B x B fp32 matrices; do not let them push the machine into swap.
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return 6 * batch * batch * 4 < 0.8 * avail


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit code."""
    if args.repeats < 1 or args.warmup < 1:
        print("error: --repeats and --warmup must be >= 1", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        print(f"error: bad --device: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"error: --device must be cuda or cpu, got {device}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    requested = args.impls or list(ALL)
    cands, skipped = [], []
    for name in requested:
        c = make_candidate(name, device, dtype)
        if isinstance(c, str):
            skipped.append({"impl": name, "reason": c})
        else:
            cands.append(c)
    if not cands:
        reasons = "; ".join(f"{s['impl']}: {s['reason']}" for s in skipped)
        print(f"error: no implementation can run here: {reasons}", file=sys.stderr)
        return 2
    names = [c.name for c in cands]
    baseline = "naive" if "naive" in names else ("open_clip" if "open_clip" in names else None)
    log = sys.stderr if args.json else sys.stdout
    report = {
        "benchmark": "contrastive loss, forward + backward",
        "command": _equivalent_command(args, device, names),
        "argv": list(sys.argv),
        "machine": machine_info(device),
        "settings": {
            "batch_sizes": args.batch_sizes,
            "dims": args.dims,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "scale": args.scale,
            "impls": names,
            "baseline": baseline,
            "flops_formula": "8 * B^2 * D",
            "memory_method": None
            if args.no_memory
            else ("cuda max_memory_allocated - memory_allocated after" if device.type == "cuda" else "spawn + VmHWM"),
        },
        "sources": {c.name: c.source for c in cands},
        "skipped": skipped,
        "results": [],
    }
    for s in skipped:
        print(f"skipping {s['impl']}: {s['reason']}", file=log)
    for dim in args.dims:
        for batch in args.batch_sizes:
            run_here = list(cands)
            if device.type == "cpu" and not _naive_fits_cpu(batch):
                run_here = [c for c in cands if c.name not in ("naive", "open_clip")]
            timings = time_candidates(run_here, batch, dim, dtype, device, args.scale, args.repeats, args.warmup)
            for c in cands:
                row = {"impl": c.name, "kind": c.kind, "batch_size": batch, "dim": dim, "dtype": args.dtype}
                t = timings.get(c.name, {"status": "skipped: full B x B logits would not fit in free memory"})
                row.update(t)
                row["tflops"] = 8 * batch * batch * dim / (row["time_ms"] * 1e-3) / 1e12 if row.get("time_ms") else None
                row["peak_extra_bytes"] = None
                if not args.no_memory and row.get("status") == "ok":
                    if device.type == "cuda":
                        try:
                            row["peak_extra_bytes"] = _cuda_peak_extra(c, batch, dim, dtype, device, args.scale)
                        except Exception as e:
                            row["memory_error"] = "oom" if is_oom(e) else f"{type(e).__name__}: {e}"
                    else:
                        probe = _cpu_peak_extra(c.name, batch, dim, args.dtype, args.scale, args.memory_timeout)
                        if "error" in probe:
                            row["memory_error"] = probe["error"]
                        else:
                            row["peak_extra_bytes"] = probe["peak_extra_bytes"]
                            row["memory_method"] = probe["method"]
                report["results"].append(row)
                print(
                    f"B={batch} D={dim} {c.name}: {row.get('status')} "
                    f"{fmt(row.get('time_ms'), '.1f')} ms, "
                    f"{fmt(None if row['peak_extra_bytes'] is None else row['peak_extra_bytes'] / 2**20, '.1f')} MB",
                    file=log,
                    flush=True,
                )
    _add_ratios(report["results"], baseline)
    table = format_table(report["results"], baseline)
    report["table"] = table
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loss_bench.json").write_text(json.dumps(report, indent=2) + "\n")
        note = _plot(report["results"], args.out / "loss_bench.png")
        print(note or f"wrote {args.out / 'loss_bench.json'} and {args.out / 'loss_bench.png'}", file=log)
    print(table, file=log, flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _equivalent_command(args: argparse.Namespace, device: torch.device, names: list[str]) -> str:
    # sys.argv is unhelpful when run() is called from Python; this line reproduces the run from a shell.
    parts = [
        "vlkit bench loss",
        f"--batch-sizes {','.join(map(str, args.batch_sizes))}",
        f"--dims {','.join(map(str, args.dims))}",
        f"--impls {','.join(args.impls or names)}",
        f"--dtype {args.dtype}",
        f"--device {device}",
        f"--repeats {args.repeats}",
        f"--warmup {args.warmup}",
        f"--scale {args.scale:g}",
    ]
    if args.no_memory:
        parts.append("--no-memory")
    if args.json:
        parts.append("--json")
    if args.out is not None:
        parts.append(f"--out {args.out}")
    return " ".join(parts)


def _add_ratios(results: list[dict], baseline: str | None) -> None:
    base = {(r["batch_size"], r["dim"]): r for r in results if r["impl"] == baseline}
    for r in results:
        b = base.get((r["batch_size"], r["dim"]), {})
        r["speed_vs_baseline"] = ratio(b.get("time_ms"), r.get("time_ms"))
        r["memory_vs_baseline"] = ratio(r.get("peak_extra_bytes"), b.get("peak_extra_bytes"))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m vlkit.bench.loss ...``."""
    parser = argparse.ArgumentParser(prog="vlkit bench loss")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
