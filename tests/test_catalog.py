"""Finding presets and models: vlkit list / info --list, list_models, create_model_and_transforms, dir(vlkit)."""

import json

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.catalog import CHECKPOINTS, purpose
from vlkit.cli import main
from vlkit.models import create_model
from vlkit.utils.flops import count_parameters


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_list_json_by_family_with_parameters_and_purpose(tmp_path, capsys):
    assert main(["list", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["presets"]}
    assert sorted(rows) == vlkit.list_models("tiny")
    assert {n: r["family"] for n, r in rows.items()} == {
        "clip-tiny": "clip", "vit-tiny": "vit", "llama-tiny": "llama", "neva-tiny": "neva",
        "clip-tiny-shapes": "cpu", "vit-tiny-shapes": "cpu", "neva-tiny-pretrain": "cpu", "neva-tiny-finetune": "cpu",
    }  # fmt: skip
    assert rows["vit-tiny"]["parameters"] == count_parameters(create_model("vit-tiny"))
    assert rows["vit-tiny"]["purpose"] == "a small ViT classifier for tests and CPU recipes"
    assert report["checkpoints"] == []  # no public checkpoint has a tiny preset
    assert list((tmp_path / "cache" / "vlkit").glob("presets-*.json"))  # the counts are kept for next time


def test_info_list_text_and_checkpoints(capsys):
    assert main(["info", "--list", "clip-b32"]) == 0
    out = capsys.readouterr().out
    assert "CLIP models:\n  clip-b32 " in out and "151.28 M" in out
    assert "Training recipes" in out and "clip-b32-train" in out
    assert "vlkit convert --from hf clip-vit-base-patch32 --out models/clip-b32" in out
    assert main(["info"]) == 2
    assert "vlkit info --list" in capsys.readouterr().err


def test_checkpoint_presets_exist_and_purposes_are_one_line():
    assert {c.preset for c in CHECKPOINTS} <= set(vlkit.list_models())
    for name in vlkit.list_models():
        text = purpose(name)
        assert text and "\n" not in text and len(text) <= 80 and not text.startswith(f"{name}:"), name


def test_list_models_patterns():
    assert vlkit.list_models("clip-b*") == ["clip-b16", "clip-b16-train", "clip-b32", "clip-b32-train", "clip-bigg14"]
    assert vlkit.list_models("-train") == ["clip-b16-train", "clip-b32-train", "clip-l14-train"]
    assert vlkit.list_models("nothing") == []


def test_open_clip_style_api():
    assert {"list_models", "create_model_and_transforms", "get_tokenizer", "load_model"} <= set(dir(vlkit))
    model, train, val = vlkit.create_model_and_transforms("clip-tiny", vision__num_layers=1)
    assert model.config.vision.num_layers == 1
    image = Image.new("RGB", (50, 40), "red")
    assert val(image).shape == train(image).shape == (3, 32, 32)
    ids = vlkit.get_tokenizer("clip-tiny")(["a red circle"])
    assert ids.shape == (1, model.config.text.encoder_seq_length) and ids.dtype == torch.long
    assert model.encode_text(ids).shape == (1, model.config.output_dim)
