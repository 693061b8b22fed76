"""`vlkit bench tokenizer`: a tiny run through run() and the CLI (keys and positive numbers, no timing claims)."""

from __future__ import annotations

import argparse
import json

import pytest

from vlkit.bench import tokenizer as bench


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--n", "40", "--passes", "2", "--peers", "open_clip", "--json"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_run_json_report(capsys):
    pytest.importorskip("open_clip")
    assert bench.run(_args()) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"n", "seed", "passes", "context_length", "cleaning_paths", "results", "speedup_vs_open_clip"} <= set(report)
    assert report["n"] == 40 and report["identical_to_open_clip"] is True
    assert set(report["results"]) == {"vlkit", "open_clip"}
    for result in report["results"].values():
        for key in ("setup_s", "first_pass_s", "first_pass_strings_per_s", "repeat_best_s", "repeat_strings_per_s"):
            assert result[key] > 0, key
    assert report["speedup_vs_open_clip"]["first_pass"] > 0
    assert abs(sum(report["cleaning_paths"].values()) - 1) < 1e-9


def test_table_output_and_bad_options(capsys):
    assert bench.run(_args(json=False, peers="none", passes=1)) == 0
    out = capsys.readouterr().out
    assert "vlkit" in out and "str/s" in out
    assert bench.run(_args(peers="sentencepiece")) == 2
    assert "unknown peers" in capsys.readouterr().err


def test_synthetic_captions_are_deterministic_and_varied():
    captions = bench.synthetic_captions(2000, seed=3)
    assert captions == bench.synthetic_captions(2000, seed=3)
    assert len(set(captions)) > 1500
    assert any(not c.isascii() for c in captions) and any("&amp;" in c for c in captions)


def test_cli_registers_the_command():
    from vlkit.cli import build_parser

    args = build_parser().parse_args(["bench", "tokenizer", "--n", "5", "--json"])
    assert args.func is bench.run and args.n == 5
