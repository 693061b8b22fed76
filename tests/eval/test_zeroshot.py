import json
import math

import pytest
import torch
import torch.nn.functional as F
from eval_fakes import FakeCLIP, identity, index_images

from vlkit.eval import EvalUsageError, average_prompt_embeddings, build_classifier, evaluate_zeroshot
from vlkit.eval.templates import (
    builtin_templates,
    fill_template,
    imagenet_classnames,
    openai_imagenet_templates,
    resolve_classnames,
    resolve_templates,
)
from vlkit.eval.topk import TopKCounter

CLASSES = ["zero", "one", "two", "three"]
# Image i's feature; labels are [0, 0, 1, 1, 2, 2, 3, 3]. Images 1 and 7 are misclassified (as 1 and 2): top-1 6/8.
IMAGE_FEATURES = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 1.0, 0.0, 0.0],  # label 0, second best
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.2, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.1, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.3, 0.2, 1.0, 0.0],  # label 3, ranked last
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def one_hot_model() -> FakeCLIP:
    return FakeCLIP(IMAGE_FEATURES, {name: torch.eye(4)[i] for i, name in enumerate(CLASSES)})


def batches():
    for s in (slice(0, 4), slice(4, 8)):
        idx = list(range(8))[s]
        yield {"image": index_images(idx), "label": LABELS[s], "key": [f"img{i}" for i in idx]}


def test_zeroshot_known_answer():
    model = one_hot_model()
    r = evaluate_zeroshot(
        model, batches(), classnames=CLASSES, templates=["{}"], tokenizer=model.tokenizer, transform=identity,
        topk=(1, 2, 5), predictions_topk=3, progress=False,
    )  # fmt: skip
    assert r.metrics["acc1"] == 0.75
    assert r.metrics["acc2"] == 7 / 8
    assert r.metrics["acc5"] == 1.0  # capped at the 4 classes
    assert r.metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 + 1 + 1 / 2) / 4)
    assert r.num_samples == 8
    cm = r.details["confusion_matrix"]
    assert cm[0].tolist() == [1, 1, 0, 0] and cm[3].tolist() == [0, 0, 1, 1] and int(cm.trace()) == 6
    pred = r.details["predictions"]
    assert pred["key"][7] == "img7" and pred["topk_indices"][7].tolist() == [2, 0, 1]
    assert pred["label"].tolist() == LABELS.tolist()
    assert (pred["topk_probs"].sum(1) <= 1 + 1e-6).all() and (pred["topk_probs"][:, 0] > 0.25).all()
    assert model.training  # flags restored (the fake starts in train mode)
    assert r.task == "zeroshot_classification"


def test_mean_per_class_recall_arithmetic():
    # labels [0,0,0,1,2,2], top-1 [0,0,1,1,2,0]; class 3 has no sample and is left out of the mean.
    counter = TopKCounter(4, topk=(1,))
    preds = torch.tensor([0, 0, 1, 1, 2, 0])
    counter.update(F.one_hot(preds, 4).float(), torch.tensor([0, 0, 0, 1, 2, 2]))
    m = counter.metrics()
    assert m["acc1"] == pytest.approx(4 / 6)
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_labels_outside_the_classes_are_a_usage_error():
    model = one_hot_model()
    bad = [{"image": index_images([0, 1]), "label": torch.tensor([0, 7])}]
    with pytest.raises(EvalUsageError, match="outside the 4 classes"):
        evaluate_zeroshot(
            model, bad, classnames=CLASSES, templates=["{}"], tokenizer=model.tokenizer, transform=identity,
            progress=False,
        )  # fmt: skip


def test_template_averaging_normalises_before_and_after():
    # One class, two prompts: a long one along x and a short one along y. Each prompt gets an equal say only when
    # normalised first: the class direction is the diagonal, while a plain mean is pulled almost onto x.
    prompts = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]])
    openai = average_prompt_embeddings(prompts)[0]
    naive = F.normalize(prompts.mean(dim=1), dim=-1)[0]
    assert torch.allclose(openai, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(naive, F.normalize(torch.tensor([5.0, 0.5]), dim=0))
    assert (openai - naive).norm() > 0.5


def test_build_classifier_matches_the_procedure_in_any_batching():
    table = {
        "a cat.": torch.tensor([10.0, 0.0, 0.0]),
        "the cat.": torch.tensor([0.0, 1.0, 0.0]),
        "a dog.": torch.tensor([0.0, 0.0, 3.0]),
        "the dog.": torch.tensor([0.0, 2.0, 2.0]),
    }
    model = FakeCLIP(torch.eye(3), table)
    templates = ["a {}.", "the {c}."]  # both placeholder styles
    expected = average_prompt_embeddings(torch.stack([torch.stack([table[f"{t} {c}."] for t in ("a", "the")])
                                                      for c in ("cat", "dog")]))  # fmt: skip
    for batch_size in (1, 3, 256):
        got = build_classifier(model, ["cat", "dog"], templates, model.tokenizer, batch_size=batch_size)
        assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


def test_builtin_lists():
    classes, templates = imagenet_classnames(), openai_imagenet_templates()
    assert len(classes) == 1000 and classes[0] == "tench" and classes[-1] == "toilet paper"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert len(builtin_templates("openai7")) == 7 and set(builtin_templates("openai7")) <= set(templates)
    assert builtin_templates("simple") == ["a photo of a {}."]
    assert fill_template("a {} {}", "x{}") == "a x{} x{}" and fill_template("{c}!", "cat") == "cat!"
    assert resolve_classnames("imagenet")[0] == classes


def test_template_and_class_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(["itap of a {}."]))
    (tmp_path / "t.txt").write_text("a {}.\n\nthe {c}.\n")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a b", "c"], "templates": ["x {}"]}))
    assert resolve_templates(str(tmp_path / "t.json"))[0] == ["itap of a {}."]
    assert resolve_templates(str(tmp_path / "t.txt"))[0] == ["a {}.", "the {c}."]
    assert resolve_templates(None, tmp_path / "classes.json")[0] == ["x {}"]  # the dataset's own templates
    assert resolve_templates(None, None)[1] == "openai"
    assert resolve_classnames(str(tmp_path / "classes.json"))[0] == ["a b", "c"]
    (tmp_path / "bad.json").write_text(json.dumps(["no placeholder"]))
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        resolve_templates(str(tmp_path / "missing.txt"))


def test_zeroshot_on_shards_with_a_real_model(shapes_dir, clip_dir):
    import vlkit

    model = vlkit.load_model(clip_dir)
    r = evaluate_zeroshot(model, shapes_dir, num_workers=0, batch_size=16, predictions_topk=3, keep_images=5,
                          progress=False)  # fmt: skip
    assert r.num_samples == 40 and r.info["num_classes"] == 25 and r.info["num_templates"] == 10
    assert r.details["classes"][0] == "blue circle"  # names from the dataset's classes.json, not ImageNet
    for value in r.metrics.values():
        assert 0.0 <= value <= 1.0
    assert r.metrics["acc1"] <= r.metrics["acc5"]
    assert r.details["predictions"]["topk_indices"].shape == (40, 3)
    assert r.details["images"].shape == (5, 3, 32, 32)
    assert int(r.details["confusion_matrix"].sum()) == 40
