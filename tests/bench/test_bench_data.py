"""Smoke test of ``vlkit bench data``: both pipelines run on a few generated JPEGs and report positive numbers."""

import json

from vlkit.bench.data import format_report, run_bench
from vlkit.cli import main


def test_bench_data_cli_json(capsys):
    code = main(["bench", "data", "--samples", "24", "--batch-size", "4", "--repeat", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["workers"] == 2 and report["image_px"] == 224 and report["source_px"] == 256
    for name in ("vlkit", "open_clip"):
        r = report[name]
        assert r["samples"] > 0 and r["seconds"] > 0 and r["samples_per_s"] > 0 and r["pipeline"]
    assert report["vlkit"]["samples"] == 24
    assert report["ratio"] > 0
    assert isinstance(report["notes"], list)


def test_bench_data_equivalent_peer_in_process():
    report = run_bench(samples=16, batch_size=4, workers=0, repeat=1, equivalent=True)
    assert report["open_clip"]["pipeline"] == "webdataset, as open_clip builds it"
    assert report["vlkit"]["samples"] == 16 and report["open_clip"]["samples"] > 0
    assert "ratio vlkit / open_clip" in format_report(report)
