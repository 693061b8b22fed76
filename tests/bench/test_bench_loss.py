"""``vlkit bench loss`` on tiny CPU sizes: JSON structure, positive numbers, plot, table and usage errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from vlkit.bench import loss as bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_smoke_json_memory_and_plot(tmp_path, capsys):
    code = bench.run(
        _args("--batch-sizes", "48", "--dims", "8", "--impls", "naive,tiled,fused", "--repeats", "2", "--device",
              "cpu", "--json", "--out", str(tmp_path))
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["torch"] == torch.__version__
    assert report["command"].startswith("vlkit bench loss --batch-sizes 48 --dims 8")
    assert report["settings"]["baseline"] == "naive"
    assert report["settings"]["flops_formula"] == "8 * B^2 * D"
    ran = {(r["impl"], r["batch_size"]) for r in report["results"]}
    assert ran == {("naive", 48), ("tiled", 48)}
    for r in report["results"]:
        assert r["status"] == "ok" and r["dim"] == 8 and r["dtype"] == "fp32"
        assert r["time_ms"] > 0 and r["tflops"] > 0 and len(r["times_ms"]) == 2
        assert r["peak_extra_bytes"] > 0, r
        assert r["speed_vs_baseline"] > 0 and r["memory_vs_baseline"] > 0
    if not any(r["impl"] == "fused" for r in report["results"]):
        assert [s["impl"] for s in report["skipped"]] == ["fused"] and report["skipped"][0]["reason"]
    saved = json.loads((tmp_path / "loss_bench.json").read_text())
    assert saved["results"] == report["results"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "loss_bench.png").stat().st_size > 0


def test_table_with_peer_and_no_memory(capsys):
    code = bench.run(_args("--batch-sizes", "16", "--dims", "4", "--impls", "naive,tiled,open_clip", "--repeats", "1",
                           "--device", "cpu", "--no-memory"))  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "speed vs naive" in out and "memory vs naive" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("16 ")]
    assert sorted(r[2] for r in rows) == ["naive", "open_clip", "tiled"]
    naive_row = next(r for r in rows if r[2] == "naive")
    assert naive_row[6] == "1.00x"


def test_usage_errors():
    with pytest.raises(SystemExit):
        _args("--impls", "naive,flash")
    with pytest.raises(SystemExit):
        _args("--batch-sizes", "0,12")
    assert bench.run(_args("--repeats", "0", "--device", "cpu")) == 2
    if not torch.cuda.is_available():
        assert bench.run(_args("--device", "cuda")) == 2
