"""``vlkit predict``: top-k classes with probabilities, class names from classes.json, bad input."""

import json
import math

import pytest
import torch
from PIL import Image

from vlkit.cli import main
from vlkit.data.imagefolder import write_class_index
from vlkit.interop.native import save_model
from vlkit.models import create_model
from vlkit.train.checkpoint import CheckpointManager

NAMES = ["cat", "dog", "bird", "fish", "frog", "horse"]
BIAS = [0.0, 1.0, 3.0, -1.0, 2.0, 0.5]  # a zero weight makes the logits these biases, whatever the image


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.fixture
def model_dir(tmp_path):
    model = create_model("vit-tiny", num_classes=len(NAMES))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor(BIAS))
    path = CheckpointManager(tmp_path / "run" / "checkpoints").save(10, model, None)  # a complete one, and `latest`
    write_class_index(tmp_path / "run" / "checkpoints" / "classes.json", NAMES)  # where training puts it
    return path


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, color in enumerate(["red", "blue"]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), color).save(path)
        paths.append(str(path))
    return paths


def test_json_topk_with_names_and_probabilities(model_dir, images, capsys):
    assert main(["predict", "--model", str(model_dir), *images, "--topk", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == images
    probs = softmax(BIAS)
    for row in rows:
        assert [p["class"] for p in row["predictions"]] == ["bird", "frog", "dog"]
        assert [p["index"] for p in row["predictions"]] == [2, 4, 1]
        assert [p["probability"] for p in row["predictions"]] == pytest.approx([probs[2], probs[4], probs[1]])


def test_text_output_from_the_run_directory(model_dir, images, capsys):
    run_dir = model_dir.parent.parent  # resolved to the latest checkpoint, names found beside it
    assert main(["predict", "--model", str(run_dir), images[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 1 + 5  # top-5 by default
    assert lines[1] == f"  {softmax(BIAS)[2]:.4f}  bird"


def test_without_classes_json_classes_are_indices(tmp_path, images, capsys):
    model = create_model("vit-tiny", num_classes=3)
    save_model(model, tmp_path / "m")
    assert main(["predict", "--model", str(tmp_path / "m"), images[0], "--topk", "9"]) == 0
    out = capsys.readouterr().out
    assert out.count("0.3333  class ") == 3  # zero head: uniform; top-k stops at the number of classes


def test_bad_images_and_models(model_dir, images, tmp_path, capsys):
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", "--model", str(model_dir), str(broken), images[1]]) == 1
    captured = capsys.readouterr()
    assert str(broken) in captured.err and images[1] in captured.out  # the good image is still classified
    save_model(create_model("clip-tiny"), tmp_path / "clip")
    assert main(["predict", "--model", str(tmp_path / "clip"), images[0]]) == 2
    assert "not a ViT classifier" in capsys.readouterr().err
