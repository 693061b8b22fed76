"""Trained tiny runs shared by the serving tests: a CLIP run on the shapes dataset, a NeVA stage-2 run on
shapes-vqa and a ViT classifier run, each a few steps of ``vlkit train`` (what a user serves is a run directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlkit.cli import main

# For the docs' screenshots (docs/serving.md): VLKIT_SERVE_RUNS=DIR serves DIR/<preset name> (runs trained in full,
# e.g. by `vlkit train PRESET trainer.output_dir=DIR/PRESET`) instead of training 3 steps here.
TRAINED_RUNS = os.environ.get("VLKIT_SERVE_RUNS")


def _train(preset: str, out: Path, *overrides: str) -> Path:
    if TRAINED_RUNS and out.name == preset:
        return Path(TRAINED_RUNS) / preset
    args = ["train", preset, f"trainer.output_dir={out}", "trainer.max_steps=3", "data.num_workers=0"]
    code = main([*args, "--quiet", "schedule.warmup_steps=1", *overrides])
    assert code == 0, f"training {preset} failed"
    return out


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """The shapes image-caption dataset (shards + val folder), small."""
    from vlkit.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("serve-shapes")
    write_shapes_dataset(root, train=64, val=32, progress=False)
    return root


@pytest.fixture(scope="session")
def clip_run(shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-runs") / "clip-tiny-shapes"
    return _train("clip-tiny-shapes", out, f"data.train_path={shapes_dir}", "trainer.micro_batch_size=16")


@pytest.fixture(scope="session")
def deep_clip_run(shapes_dir, tmp_path_factory) -> Path:
    """clip-tiny-shapes with a deep, narrow image tower (12 x 64 instead of 4 x 128; one step): a forward pass of one
    image costs about what the whole HTTP request around it does, as for most models served on a CPU, rather than a
    fraction of it -- what the batching load test measures (see docs/benchmarks.md#serving for both models)."""
    out = tmp_path_factory.mktemp("serve-runs") / "clip-deep-shapes"
    return _train("clip-tiny-shapes", out, f"data.train_path={shapes_dir}", "trainer.micro_batch_size=8",
                  "model.vision.num_layers=12", "model.vision.hidden_size=64", "model.vision.ffn_hidden_size=128",
                  "trainer.max_steps=1", "schedule.warmup_steps=0")  # fmt: skip


@pytest.fixture(scope="session")
def vqa_dir(tmp_path_factory) -> Path:
    from vlkit.data.shapes_vqa import write_shapes_vqa

    root = tmp_path_factory.mktemp("serve-vqa")
    write_shapes_vqa(root, train=32, val=8, progress=False)
    return root


@pytest.fixture(scope="session")
def neva_run(vqa_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-runs") / "neva-tiny-finetune"
    return _train("neva-tiny-finetune", out, f"data.train_path={vqa_dir / 'instruct_train.json'}",
                  f"model.llm.tokenizer={vqa_dir / 'tokenizer'}", "model.mm_cfg.pretrain_mm_mlp_adapter=null",
                  "trainer.micro_batch_size=4")  # fmt: skip


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory) -> Path:
    """A ViT classifier trained on the shapes classification folders (class names come with the run)."""
    from vlkit.data.shapes import write_shapes_dataset

    data = tmp_path_factory.mktemp("serve-classes")
    write_shapes_dataset(data, train=64, val=32, classification=True, progress=False)
    out = tmp_path_factory.mktemp("serve-runs") / "vit-tiny-shapes"
    return _train("vit-tiny-shapes", out, f"data.train_path={data / 'train'}", "trainer.micro_batch_size=16")
