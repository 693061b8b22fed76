"""Issue 16's check: the NeVA document's YAML blocks (seeds/003), unedited, with ``data_dir`` holding a test-made
``llama-2-13b-chat-tp8.nemo`` and ``$VLKIT_MODELS`` a CLIP-L-shaped (tiny, same keys) Hugging Face directory, train
stage 1 on the shapes VQA data on the CPU; ``vlkit info`` on the blocks shows CLIP ViT-L/14 and LLaMA-2-13B.

Command-line overrides (tiny shapes and steps only): ``data_dir``, the data path, the run directory, 2 steps of
batch 2, ``model.mm_cfg.vision_encoder.hidden_size`` (the tiny tower's width; the document declares 1024)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from nemo_files import write_nemo
from transformers import CLIPConfig, CLIPModel

from vlkit.cli import main
from vlkit.data.shapes_vqa import write_shapes_vqa
from vlkit.info import describe
from vlkit.models import create_model

SEED = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "003_3ce42468acfde32e.txt"
pytestmark = pytest.mark.skipif(not SEED.is_file(), reason=f"specification document {SEED} not beside the checkout")


def yaml_blocks(text: str) -> list[str]:
    """Every ``.. code-block:: yaml`` body of an rst document, dedented."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        i += 1
        if lines[i - 1].strip() != ".. code-block:: yaml":
            continue
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def document_config(tmp_path: Path, base: str) -> Path:
    """The document's four blocks, verbatim, each under ``model:`` in a file based on the previous one."""
    path: str | Path = base
    for i, block in enumerate(yaml_blocks(SEED.read_text())):
        file = tmp_path / f"neva-doc-{i}.yaml"
        file.write_text(f"base: {path}\nmodel:\n{textwrap.indent(block, '  ')}\n")
        path = file
    return path


def tiny_clip_l(directory: Path) -> None:
    """CLIP ViT-L/14's keys and patch size at a tiny width (28 px: 2x2 patches)."""
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"crop_size": 28, "size": 28}))


@pytest.fixture
def world(tmp_path, monkeypatch):
    data_dir, models = tmp_path / "datasets", tmp_path / "models"
    torch.manual_seed(0)
    llm = create_model("llama-tiny")
    (data_dir / "neva" / "checkpoints").mkdir(parents=True)
    write_nemo(data_dir / "neva" / "checkpoints" / "llama-2-13b-chat-tp8.nemo", llm, tp=2)
    tiny_clip_l(models / "openai" / "clip-vit-large-patch14")
    monkeypatch.setenv("VLKIT_MODELS", str(models))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return tmp_path, data_dir


def test_document_yaml_trains_stage1_on_the_cpu(world):
    tmp_path, data_dir = world
    write_shapes_vqa(tmp_path / "shapes", train=8, val=2, progress=False)
    cfg = document_config(tmp_path, "neva-tiny-pretrain")
    code = main([
        "train", str(cfg), f"data_dir={data_dir}", f"data.train_path={tmp_path}/shapes/pretrain_train.json",
        f"trainer.output_dir={tmp_path}/run", "trainer.max_steps=2", "trainer.micro_batch_size=2",
        "trainer.accelerator=cpu", "trainer.logging.tensorboard=false", "data.num_workers=0",
        "model.mm_cfg.vision_encoder.hidden_size=32",
    ])  # fmt: skip
    assert code == 0
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model"]
    assert (saved["vision"]["patch_dim"], saved["vision"]["hidden_size"], saved["vision"]["img_h"]) == (14, 32, 28)
    assert (saved["llm"]["hidden_size"], saved["llm"]["num_layers"], saved["llm"]["vocab_size"]) == (64, 2, 512)


def test_info_on_the_document_block_shows_clip_l14_and_llama2_13b(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "none"))
    cfg = document_config(tmp_path, "neva-llama2-7b-pretrain")
    report = describe(cfg, [f"data_dir={tmp_path}"])
    vision = report["config"]["model"]["vision"]
    assert (vision["hidden_size"], vision["num_layers"], vision["patch_dim"]) == (1024, 24, 14)
    assert report["projector"] == "linear 1024 -> 5120"
    assert round(report["parameters"]["llm"] / 1e9, 1) == 13.0
    assert any("openai/clip-vit-large-patch14: architecture from vlkit's table" in n for n in report["notes"])
