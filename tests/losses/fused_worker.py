"""Runs fused-loss cases under Triton's CPU interpreter for ``test_fused.py``.

The interpreter has to be chosen before Triton is first imported, and the pytest process may already have imported
it in compiled mode (or other tests may rely on that), so the kernels run here, in a child process started with
``TRITON_INTERPRET=1``. Reads a JSON list of cases on stdin and prints one JSON object mapping case id to metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference(x, y, scale, labels):
    """Float64 loss and gradients from the full logits: the definition, written out."""
    x = x.detach().double().requires_grad_()
    y = y.detach().double().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    N = x.shape[0]
    rows = torch.arange(N)
    tgt = rows if labels is None else labels
    keep = tgt >= 0  # negative labels drop their row's pair
    rows, tgt = rows[keep], tgt[keep]
    logits = s * x @ y.T
    image_to_text = torch.log_softmax(logits, dim=1)[rows, tgt]
    # Column tgt[i] targets row i.
    text_to_image = torch.log_softmax(logits, dim=0)[rows, tgt]
    loss = -(image_to_text.sum() + text_to_image.sum()) / (2 * N)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def make_features(case, gen):
    B, D = case["B"], case["D"]
    M = case.get("M", B)
    kind = case.get("features", "random")
    x = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(M, D, generator=gen, dtype=torch.float64), dim=1)
    if kind == "identical":
        x = x[:1].expand(B, D).clone()
        y = x.clone()
    elif kind == "antipodal":
        # Every logit is -scale: the most negative possible, and all equal.
        x = x[:1].expand(B, D).clone()
        y = -x
    elif kind == "pair_antipodal":
        y = -x
    elif kind == "half_antipodal":
        # Logits +scale and -scale in the same tiles: the widest possible range (2 * scale).
        v = x[:1].expand(B, D).clone()
        sign = torch.where(torch.arange(B) % 2 == 0, 1.0, -1.0).double()[:, None]
        x, y = v * sign, v.clone()
    return x, y


def _cpu_bench(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _tuning(enabled):
    """Turns the kernels' own autotuner on with a CPU timer and two candidates per kernel (interpreter tiles)."""
    from vlkit.losses import _fused_kernels as k

    if not hasattr(k, "_orig_candidates"):
        k._orig_candidates = k.candidates
    k.AUTOTUNE = enabled
    k.BENCH = _cpu_bench if enabled else None
    k.TUNED.clear()
    if enabled:
        # A wide-N and a tall-M tile, so the chosen shape changes partial-buffer and d(scale) sizes.
        k.candidates = lambda kernel, nbytes: [k._meta(32, 64, 32, 4, 1), k._meta(64, 32, 64, 4, 1)]
    else:
        k.candidates = k._orig_candidates


def run_case(case):
    from vlkit.losses import _fused_kernels as k
    from vlkit.losses.fused import FusedPlan, fused_contrastive_loss

    _tuning(case.get("tune", False))
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    dtype = DTYPES[case["dtype"]]
    x64, y64 = make_features(case, gen)
    B, M = case["B"], case.get("M", case["B"])
    labels = None
    if case.get("labels") == "perm":
        labels = torch.randperm(B, generator=gen)
    elif case.get("labels") == "dup":
        labels = torch.randint(0, M, (B,), generator=gen)
    elif case.get("labels") == "ignore":
        # Duplicates plus about a quarter of the rows ignored (-1), the way sharded batches mark foreign rows.
        labels = torch.randint(0, M, (B,), generator=gen)
        labels[torch.rand(B, generator=gen) < 0.25] = -1
    x = x64.to(dtype)
    y = y64.to(dtype)
    if case.get("noncontig"):
        # Strided views: every other column of a wider tensor, and a transposed copy.
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
        y = y.T.contiguous().T
        assert not x.is_contiguous() and not y.is_contiguous()
    requires = case.get("requires", ["x", "y", "scale"])
    x = x.requires_grad_("x" in requires)
    y = y.requires_grad_("y" in requires)
    # A plain float scale takes the no-gradient path.
    scale = torch.tensor(case["scale"], requires_grad=True) if "scale" in requires else case["scale"]
    plan = FusedPlan(**case.get("plan", {}))
    loss = fused_contrastive_loss(x, y, scale, labels, plan=plan)
    loss.backward()
    ref = reference(x, y, case["scale"], labels)
    got = {"loss": loss.detach(), "dx": x.grad, "dy": y.grad, "dscale": getattr(scale, "grad", None)}
    present = [t for t in got.values() if t is not None]
    out = {"finite": all(bool(torch.isfinite(t).all()) for t in present), "dtypes": {}}
    out["tuned"] = sorted(key[0] for key in k.TUNED)
    _tuning(False)
    for (name, g), r in zip(got.items(), ref):
        if g is None:
            continue
        out["dtypes"][name] = str(g.dtype)
        out[name] = {"abs": float((g.double() - r).norm()), "ref": float(r.norm())}
    return out


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    cases = json.load(sys.stdin)
    results = {}
    for case in cases:
        try:
            results[case["id"]] = run_case(case)
        except Exception as e:  # noqa: BLE001 - reported per case to the test
            results[case["id"]] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
