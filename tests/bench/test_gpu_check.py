"""`make gpu-check DRY=1`: the prepared GPU call rehearsed on the CPU at tiny sizes (Triton's interpreter), so the
script is known to work before a GPU is ever lent; and its report logic on a failing step."""

import json

from vlkit.bench import gpu_check


def test_dry_run_runs_every_step_and_reports(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["fused", "loss", "train-clip-b16", "run-clip-b16"]
    assert all(s["status"] == "ok" and s["result"] is not None for s in report["steps"])
    fused = report["steps"][0]["result"]
    assert fused["checks"] and all(c["pass"] for c in fused["checks"])
    pair = report["steps"][3]["result"]
    assert pair["pass"] and len(pair["losses"]["fast"]) == len(pair["losses"]["fp32"]) == 4
    assert "| fused loss correctness |" in report["table"]
    assert "train-clip-b16 vlkit" in report["table"] and "x open_clip" in report["table"]


def test_a_failing_or_slow_step_never_loses_the_others(tmp_path, monkeypatch):
    def fake_steps(dry):
        return [
            gpu_check.Step("boom", 30, ["-m", "vlkit.bench.no_such_module"], None),
            gpu_check.Step("slow", 12, ["-c", "import time; time.sleep(60)"], "never.json"),
            gpu_check.Step("late", 30, ["-c", "pass"], None),
        ]

    monkeypatch.setattr(gpu_check, "steps", fake_steps)
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--budget", "20"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    boom, slow, late = report["steps"]
    assert boom["status"].startswith("failed") and "No module named" in boom["log_tail"]
    assert slow["status"] == "timed out after 12 s" and slow["result"] is None
    assert late["status"].startswith("skipped")  # less than 10 s of the call left
    assert "| boom | failed (exit 1) |" in report["table"]
