import json

import pytest
import torch
from eval_fakes import FakeCLIP, identity, index_images

from vlkit.eval import evaluate_retrieval, rank_metrics, retrieval_metrics, retrieval_ranks
from vlkit.eval.data import split_captions

# Similarities image x text, two captions per image (texts 2i and 2i+1 describe image i). With one-hot image
# features, text t's feature is column t, so the dot products are exactly this matrix.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],
        [0.2, 0.3, 0.4, 0.8, 0.1, 0.6],
        [0.1, 0.7, 0.3, 0.2, 0.05, 0.4],
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
# Image 2's best caption (t5, 0.4) is beaten by t1 (0.7): rank 2. Text ranks: count images beating the true one.
I2T = [1, 1, 2]
T2I = [1, 3, 2, 1, 3, 2]


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 4096])
def test_known_ranks_with_several_captions_per_image(chunk_size):
    i2t, t2i = retrieval_ranks(torch.eye(3), SIM.T.contiguous(), TEXT_TO_IMAGE, chunk_size=chunk_size)
    assert i2t.tolist() == I2T and t2i.tolist() == T2I
    m = retrieval_metrics(torch.eye(3), SIM.T.contiguous(), TEXT_TO_IMAGE, ks=(1, 2, 5), chunk_size=chunk_size)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)  # image -> text: a hit if either caption is top-1
    assert m["text_retrieval_recall@2"] == 1.0
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 6)  # text -> image
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 6)
    assert m["image_retrieval_recall@5"] == 1.0
    assert m["image_retrieval_mean_rank"] == 2.0 and m["image_retrieval_median_rank"] == 2.0
    assert m["text_retrieval_mean_rank"] == pytest.approx(4 / 3) and m["text_retrieval_median_rank"] == 1.0


def test_ties_count_against_the_model():
    # Every feature the same: a collapsed model must not score perfect recall.
    i2t, t2i = retrieval_ranks(torch.ones(4, 2), torch.ones(8, 2), torch.arange(8) // 2)
    assert i2t.tolist() == [7] * 4  # 6 false captions tie with the best true one
    assert t2i.tolist() == [4] * 8


def _sort_reference(images, texts, text_to_image):
    """Ranks from a full similarity matrix and argsort (fine without ties)."""
    sim = images @ texts.T
    i2t = []
    for i in range(len(images)):
        order = sim[i].argsort(descending=True)
        i2t.append(int(torch.isin(order, (text_to_image == i).nonzero()[:, 0]).nonzero()[0]) + 1)
    t2i = [int((sim[:, t].argsort(descending=True) == text_to_image[t]).nonzero()[0]) + 1 for t in range(len(texts))]
    return i2t, t2i


def test_chunked_equals_unchunked_on_random_features():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, dim = 37, 101, 16
    images = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n_txt, dim, generator=g), dim=-1)
    owner = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    owner = owner[torch.randperm(n_txt, generator=g)]
    whole = retrieval_ranks(images, texts, owner, chunk_size=10_000)
    ref_i2t, ref_t2i = _sort_reference(images, texts, owner)
    assert whole[0].tolist() == ref_i2t and whole[1].tolist() == ref_t2i
    for chunk in (7, 13, 36):  # none divides 37 or 101
        part = retrieval_ranks(images, texts, owner, chunk_size=chunk)
        assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])
    assert retrieval_metrics(images, texts, owner, chunk_size=7) == rank_metrics(*whole)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="no text"):
        retrieval_ranks(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 5]))


def test_split_captions():
    assert split_captions("a cat\n\n  a dog \n") == ["a cat", "a dog"]
    assert split_captions(json.dumps({"captions": ["x", " ", "y"]}), "json") == ["x", "y"]
    assert split_captions(json.dumps({"caption": "one"}), "json") == ["one"]
    assert split_captions(json.dumps(["p", "q"]), "json") == ["p", "q"]
    assert split_captions("not json", "json") == []


def test_evaluate_retrieval_on_batches_with_several_captions():
    captions = [[f"t{2 * i}", f"t{2 * i + 1}"] for i in range(3)]
    model = FakeCLIP(torch.eye(3), {f"t{t}": SIM[:, t] for t in range(6)})
    data = [
        {"image": index_images([0, 1]), "captions": captions[:2]},
        {"image": index_images([2]), "captions": captions[2:]},
    ]
    r = evaluate_retrieval(model, data, tokenizer=model.tokenizer, transform=identity, ks=(1, 2), progress=False)
    assert r.num_samples == 3 and r.info["num_texts"] == 6 and r.task == "zeroshot_retrieval"
    assert r.details["image_to_text_ranks"].tolist() == I2T and r.details["text_to_image_ranks"].tolist() == T2I
    assert r.metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_evaluate_retrieval_on_shards(shapes_dir, clip_dir):
    import vlkit

    model = vlkit.load_model(clip_dir)
    r = evaluate_retrieval(model, shapes_dir / "val", num_workers=0, batch_size=16, chunk_size=7, progress=False)
    assert r.num_samples == 40 and r.info["num_texts"] == 40
    for k in (1, 5, 10):
        assert 0.0 <= r.metrics[f"image_retrieval_recall@{k}"] <= 1.0
        assert 0.0 <= r.metrics[f"text_retrieval_recall@{k}"] <= 1.0
    assert 1.0 <= r.metrics["image_retrieval_median_rank"] <= 40.0
    # The shapes JSON member carries the caption too: the json caption format reads it.
    j = evaluate_retrieval(model, shapes_dir, caption_key="json", num_workers=0, batch_size=16, progress=False)
    assert j.metrics == r.metrics
