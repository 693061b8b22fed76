"""Exactness of the fused (Triton) contrastive loss, on the CPU through Triton's interpreter.

The kernels run in ``fused_worker.py`` child processes started with ``TRITON_INTERPRET=1`` (the interpreter must be
selected before Triton is imported, and this pytest process must not be switched into it). Each case compares the
loss and the three gradients against a float64 reference built from the full logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from vlkit.losses.fused import fused_available, fused_contrastive_loss

WORKER = Path(__file__).with_name("fused_worker.py")
REPO = Path(__file__).resolve().parents[2]
# Forces several forward panels and a ragged grid of backward blocks at B <= 100 (interpreter tiles are 64).
SPLIT = {"fwd_rows": 64, "bwd_rows": 64, "bwd_cols": 48}


def _cases() -> list[dict]:
    cases = []
    i = 0
    for B in (1, 7, 64, 100):
        for D in (8, 64, 130):
            for scale in (1.0, 14.3, 100.0):
                case = {"id": f"fp32-B{B}-D{D}-s{scale:g}", "B": B, "D": D, "scale": scale, "dtype": "fp32"}
                case["plan"] = {"gemm": ("triton", "cublas")[i % 2], **(SPLIT if (i // 2) % 2 == 0 else {})}
                case["seed"] = i
                cases.append(case)
                i += 1
    for B in (7, 100):
        for D in (64, 130):
            for scale in (14.3, 100.0):
                gemm = ("triton", "cublas")[i % 2]
                cases.append(
                    {"id": f"bf16-B{B}-D{D}-s{scale:g}", "B": B, "D": D, "scale": scale, "dtype": "bf16", "seed": i}
                    | {"plan": {"gemm": gemm, **SPLIT}}
                )
                i += 1
    for B, D, scale in ((100, 64, 1.0), (100, 130, 100.0), (7, 8, 14.3)):
        cases.append({"id": f"fp16-B{B}-D{D}-s{scale:g}", "B": B, "D": D, "scale": scale, "dtype": "fp16"})
    for dtype, labels, B, D, scale, gemm in (
        ("fp32", "perm", 100, 64, 14.3, "triton"),
        ("fp32", "dup", 64, 64, 14.3, "cublas"),
        ("fp32", "dup", 100, 130, 100.0, "triton"),
        ("bf16", "perm", 100, 130, 100.0, "cublas"),
        ("fp16", "dup", 100, 64, 14.3, "triton"),
    ):
        cases.append(
            {"id": f"labels-{labels}-{dtype}-B{B}", "B": B, "D": D, "scale": scale, "dtype": dtype}
            | {"labels": labels, "plan": {"gemm": gemm, **SPLIT}}
        )
    for dtype, labels, B, M, gemm in (
        ("fp32", "dup", 100, 70, "triton"),
        ("fp32", "ignore", 50, 130, "cublas"),
        ("fp32", "ignore", 100, 100, "triton"),
        ("bf16", "ignore", 100, 70, "cublas"),
        ("fp16", "ignore", 70, 100, "triton"),
    ):
        cases.append(
            {"id": f"labels-{labels}-{dtype}-N{B}-M{M}", "B": B, "M": M, "D": 64, "scale": 14.3, "dtype": dtype}
            | {"labels": labels, "plan": {"gemm": gemm, **SPLIT}}
        )
    for features in ("identical", "antipodal", "pair_antipodal", "half_antipodal"):
        for dtype in ("fp32", "bf16"):
            cases.append(
                {"id": f"edge-{features}-{dtype}", "B": 100, "D": 64, "scale": 100.0, "dtype": dtype}
                | {"features": features, "degenerate": True, "plan": {"gemm": "triton", **SPLIT}}
            )
    # The autotuner's plumbing: tile shapes chosen at run time must size the partial buffers consistently.
    for dtype, gemm in (("fp32", "triton"), ("bf16", "triton")):
        cases.append(
            {"id": f"autotune-{dtype}", "B": 100, "D": 64, "scale": 14.3, "dtype": dtype, "tune": True}
            | {"plan": {"gemm": gemm, **SPLIT}}
        )
    # The widest D promised (20 K-steps of the interpreter's BLOCK_K), one tile and a ragged two-by-two grid.
    cases.append({"id": "fp32-B64-D1280", "B": 64, "D": 1280, "scale": 14.3, "dtype": "fp32"})
    cases.append({"id": "bf16-B100-D1280", "B": 100, "D": 1280, "scale": 100.0, "dtype": "bf16"})
    cases.append({"id": "noncontig-fp32", "B": 64, "D": 64, "scale": 14.3, "dtype": "fp32", "noncontig": True})
    cases.append({"id": "noncontig-bf16", "B": 100, "D": 130, "scale": 14.3, "dtype": "bf16", "noncontig": True})
    cases.append({"id": "grad-x-only", "B": 100, "D": 64, "scale": 14.3, "dtype": "bf16", "requires": ["x"]})
    cases.append({"id": "grad-y-scale", "B": 100, "D": 64, "scale": 14.3, "dtype": "fp32", "requires": ["y", "scale"]})
    return cases


CASES = _cases()


def _run_workers(cases: list[dict], shards: int = 2) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(shards):
            path = Path(tmp) / f"cases{k}.json"
            path.write_text(json.dumps(cases[k::shards]))
            with path.open() as stdin:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER)],
                        stdin=stdin,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        env=env,
                        cwd=REPO,
                        text=True,
                    )
                )
        results = {}
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, f"fused worker failed:\n{err[-4000:]}"
            results.update(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def fused_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the fused loss cannot run")
    return _run_workers(CASES)


def _tolerances(case: dict) -> tuple[float, float]:
    # fp32 with IEEE dots is ~1e-7 accurate; 16-bit features round dS and the gradients to the feature dtype.
    rtol = 1e-5 if case["dtype"] == "fp32" else 1e-2
    # B = 1 has a loss of exactly 0; the kernels' log2/exp2 round trip leaves ~1e-7 * scale there.
    atol = 1e-7 * max(1.0, case["scale"])
    return rtol, atol


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fused_matches_float64_reference(fused_results, case):
    res = fused_results[case["id"]]
    assert "error" not in res, res.get("error")
    assert res["finite"], "loss or gradients are not finite"
    rtol, atol = _tolerances(case)
    want_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[case["dtype"]]
    for name in ("dx", "dy"):
        if name in res["dtypes"]:
            assert res["dtypes"][name] == want_dtype
    assert res["dtypes"]["loss"] == "torch.float32"
    requires = case.get("requires", ["x", "y", "scale"])
    expected = {"loss"} | {n for n, r in (("dx", "x"), ("dy", "y"), ("dscale", "scale")) if r in requires}
    assert set(res["dtypes"]) == expected
    if case.get("tune"):
        assert set(res["tuned"]) == {"ds", "fwd", "gemm"}
    for name in sorted(expected):
        err, ref = res[name]["abs"], res[name]["ref"]
        bound = rtol * ref + atol
        if case.get("degenerate") and name != "loss":
            # Identical/antipodal features give exactly-zero reference gradients (all logits equal), so errors are
            # measured against the gradients' natural size, scale / sqrt(B), instead.
            bound = rtol * (ref + case["scale"] / case["B"] ** 0.5)
        assert err <= bound, f"{name}: |fused - ref| = {err:.3e} > {bound:.3e} (|ref| = {ref:.3e})"


def test_fused_available_off_without_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process itself runs under the Triton interpreter")
    assert not fused_available("cpu")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_contrastive_loss(x, x, torch.tensor(1.0))


@pytest.mark.parametrize(
    "x, y, labels, match",
    [
        (torch.randn(4, 8), torch.randn(4, 7), None, r"\[N, D\]"),
        (torch.randn(4, 8), torch.randn(5, 8), None, "default labels"),
        (torch.randn(4, 8).double(), torch.randn(4, 8).double(), None, "supports"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.zeros(3, dtype=torch.long), "shape"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.zeros(4), "integer"),
    ],
)
def test_fused_rejects_bad_inputs(x, y, labels, match):
    with pytest.raises(ValueError, match=match):
        fused_contrastive_loss(x, y, torch.tensor(1.0), labels)
