from types import SimpleNamespace

import pytest
import torch
from eval_fakes import FakeCLIP, identity, index_images
from torch import nn

from vlkit.eval import EvalUsageError, evaluate_classifier


class TableClassifier(nn.Module):
    """Logits looked up by the index in the image's first pixel."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits, requires_grad=False)
        self.config = SimpleNamespace(num_classes=logits.shape[1])

    def forward(self, pixels):
        return self.table[pixels[:, 0, 0, 0].long()]


def test_classifier_known_answer():
    # 6 images, 7 classes; labels 0..5. Top-1 right for 0, 1, 2; image 3's label second; 4's fifth; 5's last.
    logits = torch.zeros(6, 7)
    for i in range(3):
        logits[i, i] = 1.0
    logits[3, [6, 3]] = torch.tensor([2.0, 1.0])
    logits[4] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5, 0.0, 1.0])  # label 4 ranked 5th
    logits[5] = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, -1.0, 1.0])  # label 5 ranked 7th
    model = TableClassifier(logits)
    data = [(index_images([0, 1, 2]), torch.tensor([0, 1, 2])), (index_images([3, 4, 5]), torch.tensor([3, 4, 5]))]
    r = evaluate_classifier(model, data, transform=identity, topk=(1, 2, 5), progress=False)
    assert r.metrics["acc1"] == 0.5
    assert r.metrics["acc2"] == pytest.approx(4 / 6)
    assert r.metrics["acc5"] == pytest.approx(5 / 6)
    assert r.metrics["mean_per_class_recall"] == 0.5
    assert r.task == "classification" and r.num_samples == 6


def test_clip_model_is_refused():
    with pytest.raises(EvalUsageError, match="zeroshot"):
        evaluate_classifier(FakeCLIP(torch.eye(2)), [], transform=identity, progress=False)


def test_vit_on_an_imagefolder(shapes_folder, vit_dir):
    import vlkit

    model = vlkit.load_model(vit_dir)
    r = evaluate_classifier(model, shapes_folder, num_workers=0, batch_size=8, predictions_topk=2, progress=False)
    assert r.num_samples == 30 and r.details["classes"][0] == "blue circle"
    assert r.details["predictions"]["key"][0].endswith(".png")
    for value in r.metrics.values():
        assert 0.0 <= value <= 1.0
    # The same images as shards of another dataset of the same classes would work too; a class-count mismatch not:
    small = vlkit.create_model("vit-tiny")  # 10 classes
    with pytest.raises(EvalUsageError, match="25 classes"):
        evaluate_classifier(small, shapes_folder, num_workers=0, progress=False)
