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
    assert main(["predict", "--model", str(tmp_path / "clip"), images[0]]) == 2  # a CLIP model needs labels
    assert "--labels" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir), "--labels", "a,b", images[0]]) == 2
    assert "classes are fixed" in capsys.readouterr().err


@pytest.fixture
def clip_dir(tmp_path):
    torch.manual_seed(0)
    save_model(create_model("clip-tiny"), tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_zero_shot_with_own_labels(clip_dir, images, capsys):
    import torch.nn.functional as F

    from vlkit.data.tokenizer import get_tokenizer
    from vlkit.data.transforms import get_transform
    from vlkit.interop.native import load_model

    labels = ["cat", "dog", "red car"]
    argv = ["predict", "--model", str(clip_dir), "--labels", " cat, dog ,red car", "--templates", "simple"]
    assert main([*argv, "--topk", "2", "--json", *images]) == 0
    rows = json.loads(capsys.readouterr().out)
    # The reference, written out: one prompt per label, cosine similarities times the logit scale, softmax.
    model = load_model(clip_dir).eval()
    with torch.no_grad():
        text = F.normalize(model.encode_text(get_tokenizer("clip")([f"a photo of a {n}." for n in labels])), dim=-1)
        transform = get_transform(model, train=False)
        for path, row in zip(images, rows):
            image = F.normalize(model.encode_image(transform(Image.open(path))[None]), dim=-1)
            probs = (model.scale() * image @ text.T).softmax(-1)[0]
            best = probs.argsort(descending=True)[:2].tolist()
            assert row["image"] == path
            assert [p["class"] for p in row["predictions"]] == [labels[i] for i in best]
            assert [p["probability"] for p in row["predictions"]] == pytest.approx(probs[best].tolist(), abs=1e-5)


def test_clip_labels_file_and_openai_templates(clip_dir, images, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\n\ncar\n")  # blank lines are skipped
    assert main(["predict", "--model", str(clip_dir), "--labels-file", str(labels_file), images[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 1 + 3  # top-k stops at the number of labels
    assert sorted(line.split()[1] for line in lines[1:]) == ["car", "cat", "dog"]
    assert sum(float(line.split()[0]) for line in lines[1:]) == pytest.approx(1.0, abs=2e-4)
    assert main(["predict", "--model", str(clip_dir), "--labels", "cat,,dog", images[0]]) == 2
    assert "empty label" in capsys.readouterr().err
    assert main(["predict", "--model", str(clip_dir), "--labels", "cat,cat", images[0]]) == 2
    assert "repeated label(s) cat" in capsys.readouterr().err
    assert main(["predict", "--model", str(clip_dir), "--labels-file", str(tmp_path / "no.txt"), images[0]]) == 2
    assert "no.txt" in capsys.readouterr().err
