"""``vlkit bench fused``: correctness check and benchmark of the fused contrastive loss against the naive loss.

One GPU command that checks, then times (``vlkit bench loss`` compares every implementation; this one proves the
Triton kernels at the sizes that matter first)::

    vlkit bench fused --batch-sizes 16384,65536 --dim 512 --dtype bf16 --out DIR

1. Correctness: fused loss and gradients against a float64 reference at small B (several dtypes, scales, labels,
   ragged and multi-block plans, both GEMM backends, degenerate features), and against the naive fp32 loss at
   ``--naive-check-batch`` (16384).
2. Speed: median forward+backward time (``triton.testing.do_bench``) and peak memory beyond the inputs and their
   gradients for the fused loss (each GEMM backend), the naive loss on fp32 features, and the naive loss under
   ``torch.compile`` on ``--dtype`` features; achieved TFLOP/s against the ``8 B^2 D`` floor.

Prints a table and writes ``fused_check.json`` to ``--out``. ``--device cpu`` runs the same logic through Triton's
interpreter at tiny sizes (re-executing itself with ``TRITON_INTERPRET=1``), to test this script without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(sub: argparse._SubParsersAction) -> None:
    """``vlkit bench fused ARGS``: the arguments go to :func:`main` as they are typed, since a CPU run re-executes
    itself under Triton's interpreter with the same arguments."""
    # No option prefix at this level (prefix_chars: a NUL no argument starts with): everything after "fused",
    # --help included, is collected untouched for main's own parser.
    p = sub.add_parser("fused", help=_SUMMARY, add_help=False, prefix_chars="\0")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: main(args.argv))


_SUMMARY = "correctness check and benchmark of the fused contrastive loss against the naive loss (one GPU command)"


def _parse(argv):
    p = argparse.ArgumentParser(prog="vlkit bench fused", description=_SUMMARY)
    p.add_argument("--batch-sizes", default="16384,65536", help="comma-separated B values to benchmark")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="feature dtype of the fused loss")
    p.add_argument("--out", default="fused_check_out", help="directory for fused_check.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter, tiny sizes only)")
    p.add_argument("--check-batches", default=None, help="B values of the float64 checks (default 1537,5000,10000)")
    p.add_argument("--naive-check-batch", type=int, default=None, help="B of the check against naive (16384)")
    p.add_argument("--naive-max-batch", type=int, default=131072, help="skip the naive fp32 loss above this B")
    p.add_argument("--gemms", default="cublas,triton", help="fused GEMM backends to benchmark")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile naive baseline")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--no-autotune", action="store_true", help="benchmark the fixed default configs (faster to run)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per impl (ms)")
    return p.parse_args(argv)


def _reexec_interpreted(argv) -> None:
    # Triton picks interpreter vs compiler when a kernel is decorated; only a fresh process can switch.
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "vlkit.bench.fused", *argv], env)


def naive_loss(x, y, scale, labels=None):
    """The reference peer: full ``B x B`` logits and two cross-entropies (open_clip's formulation)."""
    import torch
    import torch.nn.functional as F

    logits = scale * x @ y.T
    B = x.shape[0]
    if labels is None:
        labels = torch.arange(B, device=x.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    rows = torch.arange(B, device=x.device)
    # Column labels[i] targets row i (see vlkit.losses.fused).
    return -(logits.log_softmax(1)[rows, labels].sum() + logits.log_softmax(0)[rows, labels].sum()) / (2 * B)


def _features(B, D, dtype, device, seed, kind="random"):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    y = F.normalize(torch.randn(B, D, generator=g), dim=1)
    if kind == "matched":
        # Pairs with cosine ~0.6, like a trained model: small losses, target probabilities near 1.
        y = F.normalize(x + 1.3 * torch.randn(B, D, generator=g) / D**0.5, dim=1)
    elif kind == "identical":
        x = x[:1].expand(B, D).clone()
        y = x.clone()
    elif kind == "antipodal":
        x = x[:1].expand(B, D).clone()
        y = -x
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(fn, x, y, scale, labels=None):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    s = scale.detach().clone().requires_grad_()
    loss = fn(x, y, s, labels)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def _check_case(name, B, D, dtype, scale, device, *, plan=None, labels=None, kind="random", ref="float64", bar=None):
    import torch

    from vlkit.losses.fused import fused_contrastive_loss

    x, y = _features(B, D, dtype, device, seed=B + int(scale), kind=kind)
    s = torch.tensor(scale, device=device)
    lab = None
    if labels == "perm":
        lab = torch.randperm(B, generator=torch.Generator(device="cpu").manual_seed(1)).to(device)
    got = _grads(lambda a, b, c, d: fused_contrastive_loss(a, b, c, d, plan=plan), x, y, s, lab)
    if ref == "float64":
        want = _grads(naive_loss, x.double(), y.double(), s.double(), lab)
    else:  # the naive loss in fp32 on the same (rounded) features
        want = _grads(naive_loss, x.float(), y.float(), s, lab)
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    names = ("loss", "dx", "dy", "dscale")
    errs = {n: _rel(g, w) for n, g, w in zip(names, got, want)}
    if bar is None:
        bar = 1e-5 if dtype == torch.float32 else 1e-2
    bars = dict.fromkeys(names, bar)
    row = {"name": name, "B": B, "D": D, "dtype": str(dtype), "scale": scale, "ref": ref, "kind": kind}
    if kind == "matched" and ref == "float64":
        # Well-separated pairs: the loss and the target gradients are small differences, and no fp32 method meets
        # 1e-5 there; the bar becomes "within 4x of the naive fp32 loss's own error".
        naive32 = _grads(naive_loss, x.float(), y.float(), s, lab)
        row["naive_fp32_errors"] = {n: _rel(g, w) for n, g, w in zip(names, naive32, want)}
        bars = {n: max(bar, 4 * row["naive_fp32_errors"][n]) for n in names}
    if kind in ("identical", "antipodal"):
        # All logits equal: the exact gradients are 0, so only finiteness and the loss are meaningful.
        ok = finite and errs["loss"] <= bar
    else:
        ok = finite and all(errs[n] <= bars[n] for n in names)
    row.update({"bars": bars, "errors": errs, "finite": finite, "pass": ok, "plan": repr(plan)})
    print(
        f"  [{'PASS' if ok else 'FAIL'}] {name:38s} "
        + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        + ("" if finite else "  NON-FINITE")
        + (
            f"  (naive fp32: {' '.join(f'{v:.1e}' for v in row['naive_fp32_errors'].values())})"
            if "naive_fp32_errors" in row
            else ""
        )
    )
    del x, y, got, want
    return row


def run_checks(args, device, dtype, D):
    import torch

    from vlkit.losses.fused import FusedPlan

    cpu = device.type == "cpu"
    if args.check_batches:
        sizes = [int(b) for b in args.check_batches.split(",")]
    else:
        sizes = [37, 100, 130] if cpu else [1537, 5000, 10000]
    small, mid, big = (sizes + sizes[-1:] * 3)[:3]
    split = FusedPlan(fwd_rows=64, bwd_rows=64, bwd_cols=48) if cpu else FusedPlan(1024, 2048, 1536)
    rows = []
    print("correctness (relative L2 error vs reference; bar 1e-5 fp32, 1e-2 bf16/fp16):")
    for gemm in args.gemms.split(","):
        rows.append(_check_case(f"{gemm} {dtype} s=14.3", small, D, dtype, 14.3, device, plan=FusedPlan(gemm=gemm)))
        rows.append(
            _check_case(
                f"{gemm} {dtype} s=100 split", mid, D, dtype, 100.0, device, plan=dataclasses.replace(split, gemm=gemm)
            )
        )
    rows.append(_check_case("fp32 s=100", small, D, torch.float32, 100.0, device))
    rows.append(
        _check_case(
            "fp32 s=14.3 split", mid, D, torch.float32, 14.3, device, plan=dataclasses.replace(split, gemm="triton")
        )
    )
    rows.append(_check_case("fp16 s=14.3", small, D, torch.float16, 14.3, device))
    rows.append(_check_case("fp32 perm labels s=14.3", small, D, torch.float32, 14.3, device, labels="perm"))
    rows.append(_check_case(f"{dtype} perm labels s=100", mid, D, dtype, 100.0, device, labels="perm"))
    rows.append(_check_case(f"{dtype} default plan ragged", big, D, dtype, 14.3, device))
    for d in (130, 1280):  # a D that is no multiple of BLOCK_K, and the widest D promised
        rows.append(_check_case(f"{dtype} D={d}", small, d, dtype, 14.3, device))
        rows.append(_check_case(f"fp32 D={d}", small, d, torch.float32, 14.3, device))
    for sc in (14.3, 100.0):
        rows.append(_check_case(f"fp32 matched pairs s={sc:g}", mid, D, torch.float32, sc, device, kind="matched"))
    rows.append(_check_case(f"{dtype} matched pairs s=100", mid, D, dtype, 100.0, device, kind="matched"))
    for kind in ("identical", "antipodal"):
        rows.append(_check_case(f"{dtype} {kind} s=100", small, D, dtype, 100.0, device, kind=kind))
        rows.append(_check_case(f"fp32 {kind} s=100", small, D, torch.float32, 100.0, device, kind=kind))
    nb = args.naive_check_batch or (100 if cpu else 16384)
    rows.append(_check_case(f"{dtype} vs naive fp32", nb, D, dtype, 14.3, device, ref="naive_fp32"))
    # Both sides round in fp32 here; 1e-4 leaves room for the naive side's own error.
    rows.append(_check_case("fp32 vs naive fp32", nb, D, torch.float32, 14.3, device, ref="naive_fp32", bar=1e-4))
    gc.collect()
    return rows


def _bench_ms(fn, device, rep_ms, grads) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grads, return_mode="median"))
    times = []
    for _ in range(3):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_bytes(fn, device, leaves):
    import torch

    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    return int(peak - base - grads)


def _bench_one(name, loss_fn, x, y, s, device, rep_ms):
    import torch

    leaves = [x, y, s]

    def step():
        loss_fn(x, y, s).backward()

    row = {"impl": name, "status": "ok"}
    try:
        step()  # warm-up: compilation, autotuning, cuBLAS probing
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["ms"] = _bench_ms(step, device, rep_ms, leaves)
        row["extra_bytes"] = _peak_extra_bytes(step, device, leaves)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 - one failing impl must not hide the others' numbers
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    for t in leaves:
        t.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_bench(args, device, dtype, D):
    import torch

    from vlkit.losses import _fused_kernels as kern
    from vlkit.losses.fused import FusedPlan, fused_contrastive_loss

    rows = []
    compiled = None if args.no_compile or device.type == "cpu" else torch.compile(naive_loss, dynamic=False)
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        flops = 8.0 * B * B * D
        x, y = _features(B, D, dtype, device, seed=B, kind="matched")
        x.requires_grad_()
        y.requires_grad_()
        s = torch.tensor(14.3, device=device, requires_grad=True)
        impls = []
        for gemm in args.gemms.split(","):
            plan = FusedPlan(gemm=gemm)
            impls.append(
                (f"fused[{gemm}] {args.dtype}", lambda a, b, c, p=plan: fused_contrastive_loss(a, b, c, plan=p))
            )
        if compiled is not None:
            impls.append((f"naive+compile {args.dtype}", compiled))
        for name, fn in impls:
            row = _bench_one(name, fn, x, y, s, device, args.rep_ms)
            rows.append(_finish_row(row, B, D, flops))
        # Forward alone, for tuning: how the time splits between the LSE pass and the gradient pass.
        with torch.no_grad():
            fwd_ms = _bench_ms(lambda a=x, b=y, c=s: fused_contrastive_loss(a, b, c), device, args.rep_ms, [])
        rows.append(
            _finish_row({"impl": f"fused fwd only {args.dtype}", "status": "ok", "ms": fwd_ms}, B, D, flops / 4)
        )
        del x, y
        if args.naive_max_batch >= B:
            xf, yf = _features(B, D, torch.float32, device, seed=B, kind="matched")
            xf.requires_grad_()
            yf.requires_grad_()
            rows.append(_finish_row(_bench_one("naive fp32", naive_loss, xf, yf, s, device, args.rep_ms), B, D, flops))
            del xf, yf
        gc.collect()
    best = {" ".join(map(str, key)): {"chosen": meta, "ms": times} for key, (meta, times) in kern.TUNED.items()}
    return rows, best


def _finish_row(row, B, D, flops):
    row.update({"B": B, "D": D})
    if row.get("ms"):
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    print(
        f"  {row['impl']:28s} B={B:<7d} "
        + (f"{row['ms']:9.2f} ms {row.get('tflops', 0):7.1f} TFLOP/s" if row.get("ms") else f"{row['status']:>30s}")
        + (f"  extra {row['extra_bytes'] / 1e9:6.3f} GB" if row.get("extra_bytes") is not None else "")
    )
    return row


def _table(rows) -> str:
    head = f"| {'impl':28s} | {'B':>7s} | {'D':>5s} | {'ms':>9s} | {'TFLOP/s':>8s} | {'extra GB':>8s} | status |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r.get("ms") else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        gb = f"{r['extra_bytes'] / 1e9:.3f}" if r.get("extra_bytes") is not None else "-"
        lines.append(
            f"| {r['impl']:28s} | {r['B']:>7d} | {r['D']:>5d} | {ms:>9s} | {tf:>8s} | {gb:>8s} | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the checks and the benchmark; returns 0 when every correctness check passed."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        _reexec_interpreted(argv)
    import torch
    import triton

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for the interpreter dry run", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    D = args.dim
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "cuda": torch.version.cuda,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print("environment:", json.dumps(env))
    from vlkit.losses import _fused_kernels as kern

    t0 = time.time()
    # Checks run the fixed default configs: autotuning every dtype/label variant would mostly measure compile time.
    kern.AUTOTUNE = False
    checks = [] if args.skip_checks else run_checks(args, device, dtype, D)
    kern.AUTOTUNE = not args.no_autotune
    if kern.INTERPRET and kern.AUTOTUNE:
        # The dry run still walks the tuner (one interpreter candidate per kernel), timed on the CPU.
        kern.BENCH = lambda fn: _bench_ms(fn, device, 0, [])
    print(f"benchmark (forward + backward, median; autotune {'on' if kern.AUTOTUNE else 'off'}):")
    bench, best = run_bench(args, device, dtype, D)
    from vlkit.losses.fused import _CUBLAS_MODE

    result = {
        "env": env,
        "args": vars(args),
        "checks": checks,
        "bench": bench,
        "autotune_best": best,
        "cublas_mode": {f"{k[0]} {k[1]}": v for k, v in _CUBLAS_MODE.items()},
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused_check.json").write_text(json.dumps(result, indent=2))
    failed = [c["name"] for c in checks if not c["pass"]]
    print()
    print("autotune:", json.dumps(best), "cublas:", json.dumps(result["cublas_mode"]))
    print(f"checks: {len(checks) - len(failed)}/{len(checks)} passed" + (f"; FAILED: {failed}" if failed else ""))
    print(_table(bench))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
