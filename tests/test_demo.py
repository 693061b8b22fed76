"""`vlkit demo` end to end at a tiny size: every artefact is written and the metrics are sane."""

import json

from vlkit.cli import main


def test_demo_writes_report_metrics_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps", "3", "--train-samples", "200", "--val-samples", "40",
                 "trainer.micro_batch_size=16", "data.num_workers=0", "trainer.logging.tensorboard=false"])  # fmt: skip
    assert code == 0
    for name in ("report.md", "metrics.json", "loss.png", "confusion.png", "predictions.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["zeroshot"]["num_samples"] == 40
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert 0.0 <= metrics["zeroshot"][key] <= 1.0
    assert metrics["zeroshot"]["acc5"] >= metrics["zeroshot"]["acc1"]
    report = (out / "report.md").read_text()
    assert "zero-shot top-1" in report
    import torch

    import vlkit

    assert metrics["model_path"] == str(out / "run" / "model") and (out / "run" / "model" / "config.json").is_file()
    assert metrics["seed"] == 0 and metrics["versions"]["torch"] == torch.__version__
    assert f"The trained model is `{out / 'run' / 'model'}`" in report
    assert f"vlkit {vlkit.__version__}, torch {torch.__version__}" in report
    printed = capsys.readouterr().out
    assert f"model: {out / 'run' / 'model'} (seed 0, vlkit {vlkit.__version__}" in printed
    for command in (f"vlkit eval zeroshot --model {out / 'run' / 'model'} --data {out / 'data'}/val",
                    f"vlkit predict --model {out / 'run' / 'model'} --labels", "vlkit convert --to hf"):  # fmt: skip
        assert command in report and command in printed


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
