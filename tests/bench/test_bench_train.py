"""``vlkit bench train`` on the CPU with tiny presets: the report's structure, positive figures, and the same FLOP
count for vlkit and a peer built with the same architecture (the check that both are counted alike)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from vlkit.bench import peers
from vlkit.bench import train as bench
from vlkit.config import load_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(tmp_path, capsys, *argv: str) -> dict:
    code = bench.run(_args(*argv, "--batch-size", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json",
                           "--out", str(tmp_path)))  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0, [s.get("error") for s in report["systems"]]
    assert json.loads((tmp_path / "train_bench.json").read_text())["systems"] == report["systems"]
    return report


def _check_common(report: dict, model: str, peer: str) -> tuple[dict, dict]:
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["device"] == "cpu"
    assert report["command"].startswith(f"vlkit bench train --model {model} --batch-size 8 --steps 2 --warmup 1")
    assert report["settings"]["peers"] == [peer] and "eot at the last position" in report["settings"]["inputs"]
    assert any("MFU omitted" in n for n in report["notes"])
    ours, theirs = report["systems"]
    assert (ours["system"], ours["kind"], theirs["system"], theirs["kind"]) == ("vlkit", "vlkit", peer, "peer")
    for row in (ours, theirs):
        assert row["status"] == "ok" and len(row["times_ms"]) == 2
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and row["achieved_tflops"] > 0
        assert row["flops_per_step"] > 0 and row["params"] > 0
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # CPU: no known peak, no CUDA allocator
        assert row["ratio_vs"][peer] > 0
    assert theirs["ratio_vs"][peer] == pytest.approx(1.0)
    assert ours["nonfinite_steps"] == 0
    # Same network, counted the same way: the FLOPs agree (they are equal by construction, 1% leaves room).
    check = report["checks"][peer]
    assert check["same_network"] and check["params_vlkit"] == check["params_peer"]
    assert abs(check["flops_rel_diff"]) < 0.01
    assert abs(report["checks"]["trainer_mfu_basis_rel_diff"]) < 0.01  # the trainer's logged MFU agrees
    lines = report["table"].splitlines()
    assert "samples/s" in lines[1] and f"vs {peer}" in lines[1] and len(lines) == 4
    return ours, theirs


@pytest.mark.slow
def test_clip_tiny_against_open_clip(tmp_path, capsys):
    pytest.importorskip("open_clip")
    report = _run(tmp_path, capsys, "--model", "clip-tiny", "--precision", "fp32", "--peers", "open_clip")
    ours, theirs = _check_common(report, "clip-tiny", "open_clip")
    assert ours["loss_impl"] == {"requested": "auto", "resolved": "tiled"}
    assert ours["parallel_plan"]["autocast_dtype"] is None and ours["precision"] == "fp32"
    assert theirs["architecture_issues"] == []
    cfg = theirs["open_clip_model"]  # built from clip-tiny's own dimensions
    assert cfg["embed_dim"] == 64 and cfg["vision_cfg"]["width"] == 64 and cfg["text_cfg"]["layers"] == 2


@pytest.mark.slow
def test_vit_tiny_against_timm_bf16(tmp_path, capsys):
    pytest.importorskip("timm")
    report = _run(tmp_path, capsys, "--model", "vit-tiny", "--peers", "timm")
    ours, theirs = _check_common(report, "vit-tiny", "timm")
    assert ours["parallel_plan"]["autocast_dtype"] == "bfloat16" and theirs["precision"] == "bf16"
    assert theirs["timm_kwargs"]["embed_dim"] == 64 and theirs["timm_kwargs"]["reg_tokens"] == 0


def test_peer_configs_of_the_big_presets():
    pytest.importorskip("open_clip")
    for preset, named in (("clip-b16", "ViT-B-16"), ("clip-l14", "ViT-L-14")):
        kwargs, issues = peers.openclip_config(load_config(preset).model)
        assert issues == [] and peers.openclip_named_match(kwargs) == named
    # vit-b16's eight class tokens are one class token and seven register tokens in timm; its dropout carries over.
    kwargs, issues = peers.timm_config(load_config("vit-b16").model)
    assert issues == [] and kwargs["reg_tokens"] == 7 and kwargs["proj_drop_rate"] == 0.1
    assert peers.mlp_ratio(6144, 1408) * 1408 // 1 == 6144


def test_flop_count_includes_attention(monkeypatch):
    # The CPU's SDPA kernel is invisible to FlopCounterMode; traced on the meta device attention is counted (as on
    # CUDA): 12 B H T^2 d per layer for forward + backward.
    from vlkit.models import create_model

    cfg = load_config("clip-tiny").model
    batch, heads, d, layers = 2, 4, 16, 2
    inputs = bench.make_inputs(cfg, batch, torch.device("cpu"))
    full = bench.count_step_flops(create_model(cfg, device="meta"), "clip", inputs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: v * 1.0)
    without = bench.count_step_flops(create_model(cfg, device="meta"), "clip", inputs)
    assert full - without == sum(12 * batch * heads * t * t * d * layers for t in (17, 77))


def test_inputs_run_every_position():
    cfg = load_config("clip-tiny").model
    inputs = bench.make_inputs(cfg, 4, torch.device("cpu"))
    ids = inputs["text"]
    assert ids.shape == (4, 77) and (ids[:, -1] == cfg.text.eot_token_id).all()
    assert ((ids[:, :-1] > 0) & (ids[:, :-1] < cfg.text.eot_token_id)).all()  # no padding, no early end of text
    assert inputs["image"].shape == (4, 3, 32, 32) and inputs["image"].dtype == torch.float32


def test_run_order_puts_eager_first():
    args = _args("--compile", "all", "--peer-compile")
    assert bench._plan(args, ["open_clip"]) == [
        ("vlkit", "eager"),
        ("open_clip", "eager"),
        ("vlkit", "compile"),
        ("open_clip", "compile"),
        ("vlkit", "compile-static"),
    ]
    assert bench._plan(_args("--compile"), []) == [("vlkit", "compile")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "clip-tiny", "--peers", "timm", "--device", "cpu"], "does not train"),
        (["--model", "clip-tiny", "--peers", "nobody", "--device", "cpu"], "unknown peer"),
        (["--model", "clip-tiny", "--steps", "0", "--device", "cpu"], "must be >= 1"),
        (["--model", "no-such-preset", "--device", "cpu"], "unknown preset"),
        (["--model", "vit-tiny", "--device", "cuda:1"], "CUDA"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    assert bench.run(_args(*argv)) == 2
    assert message in capsys.readouterr().err


def test_llama_tiny_against_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    report = _run(tmp_path, capsys, "--model", "llama-tiny", "--seq-len", "32", "--peers", "transformers")
    assert report["command"].startswith("vlkit bench train --model llama-tiny --batch-size 8 --seq-len 32 --steps 2")
    ours, theirs = report["systems"]
    assert (ours["system"], theirs["system"], theirs["precision"]) == ("vlkit", "transformers", "pure bf16")
    for row in (ours, theirs):
        assert row["status"] == "ok" and row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 32)
    # The same decoder (parameters and FLOPs to the unit), and the trainer's MFU basis counts it alike.
    check = report["checks"]["transformers"]
    assert check["same_network"] and check["flops_rel_diff"] == 0.0
    assert report["checks"]["trainer_mfu_basis_rel_diff"] == 0.0
    assert "tokens/s" in report["table"].splitlines()[1]
    # 6 N per token for the matmul weights (all but the 512 x 64 embedding table), plus attention.
    dense = ours["params"] - 512 * 64
    assert 6 * dense * 8 * 32 < ours["flops_per_step"] < 1.2 * 6 * dense * 8 * 32


def test_llama_usage_errors(capsys):
    assert bench.run(_args("--model", "llama-tiny", "--seq-len", "4096", "--device", "cpu")) == 2
    assert "longer than the model's context (256)" in capsys.readouterr().err
    assert bench.run(_args("--model", "clip-tiny", "--seq-len", "64", "--device", "cpu")) == 2
    assert "LLaMA presets only" in capsys.readouterr().err
