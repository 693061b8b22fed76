"""LLaVA data: record validation, image aspect modes, the dataset (skips, counts, truncation after splicing),
collate padding, the loader's sharding and resume, and the config keys."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from vlkit.config import ConfigError, load_config
from vlkit.config.schema import OPENAI_CLIP_MEAN, DataConfig, VisionConfig
from vlkit.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConversationTokenizer, Turn
from vlkit.data.llava import (
    LlavaCollator,
    LlavaDataset,
    LlavaLoader,
    build_llava_dataset,
    image_token_count,
    image_transform,
    load_llava_records,
    read_json_records,
)
from vlkit.data.shapes_vqa import template_texts, train_chat_tokenizer
from vlkit.data.tokenizer import get_tokenizer

VISION = VisionConfig(img_h=16, img_w=16, patch_dim=8)
IMAGE_TOKENS = image_token_count(VISION)  # 4 patches (the class token dropped)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [*template_texts(), "What colour is the shape? red blue green circle square. Describe the image."] * 3
    return get_tokenizer(train_chat_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=320))


def chat(question: str, answer: str, image: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def write_json(path, samples) -> str:
    path.write_text(json.dumps(samples), encoding="utf-8")
    return str(path)


def make_dataset(tmp_path, tok, samples, template="vicuna_v1", **kw) -> LlavaDataset:
    path = write_json(tmp_path / "data.json", samples)
    kw.setdefault("max_length", 256)
    kw.setdefault("image_tokens", IMAGE_TOKENS)
    return LlavaDataset(path, ConversationTokenizer(tok, template), image_transform(VISION, "pad"), **kw)


# ------------------------------------------------------------------------------------------------------------ records


def test_malformed_records_are_reported_by_file_and_index(tmp_path):
    good = {"id": "ok", "image": "a.png", "conversations": chat("q", "a")}
    samples = [
        good,
        {"id": "role", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        good,
        {"image": "a.png", "conversations": chat("<image> twice", "a")},
        {"conversations": chat("no image field", "a")},
        "not an object",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
    ]
    path = write_json(tmp_path / "bad.json", samples)
    with pytest.raises(ValueError) as err:
        load_llava_records(path, "vicuna_v1")
    msg = str(err.value)
    assert "bad.json: 5 malformed sample(s)" in msg
    assert "bad.json sample 1 (id 'role'): conversations[1].from is 'bot'" in msg
    assert "bad.json sample 3: 2 <image> placeholders" in msg
    assert "bad.json sample 4: the text has <image> but the sample has no 'image'" in msg
    assert "bad.json sample 5: a sample must be a JSON object" in msg
    assert "bad.json sample 6: turn 1 is from 'human'" in msg
    assert "sample 0" not in msg and "sample 2" not in msg


def test_json_jsonl_and_syntax_errors(tmp_path):
    lines = [json.dumps({"id": i, "conversations": chat("q", "a", image=False)}) for i in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert [r.id for r in load_llava_records(tmp_path / "d.jsonl", "llama_2")] == ["0", "1", "2"]
    (tmp_path / "lines.json").write_text("\n".join(lines), encoding="utf-8")  # JSONL under a .json name
    assert len(read_json_records(tmp_path / "lines.json")) == 3
    (tmp_path / "broken.jsonl").write_text(lines[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl line 2: not valid JSON"):
        read_json_records(tmp_path / "broken.jsonl")
    (tmp_path / "dict.json").write_text('{"data": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list of samples, got a dict"):
        read_json_records(tmp_path / "dict.json")
    with pytest.raises(FileNotFoundError, match="LLaVA data file not found"):
        read_json_records(tmp_path / "nope.json")


def test_placeholder_normalisation(tmp_path):
    samples = [
        {"image": "a.png", "conversations": chat("what is it?", "a", image=False)},  # image without <image>
        {"image": "a.png", "conversations": [{"from": "gpt", "value": "hi"}, *chat("colour?", "red", image=False)]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "what <image> is it?"},
                                             {"from": "gpt", "value": "a"}]},
    ]  # fmt: skip
    path = write_json(tmp_path / "d.json", samples)
    records = load_llava_records(path, "vicuna_v1")
    assert records[0].turns[0] == Turn("human", "<image>\nwhat is it?")
    assert records[1].turns == (Turn("human", "<image>\ncolour?"), Turn("gpt", "red"))  # leading gpt turn dropped
    assert records[2].turns[0].text == "what <image> is it?"  # where the user put it
    front = load_llava_records(path, "vicuna_v1", sep_image_conv_front=True)
    assert front[2].turns[0].text == "<image>\nwhat  is it?"
    text_only = load_llava_records(path, "vicuna_v1", is_multimodal=False)
    assert all(r.image is None and "<image>" not in r.turns[0].text for r in text_only)
    plain = [{"image": "a.png", "conversations": chat("q", "a") + chat("q2", "a2", image=False)}]
    with pytest.raises(ValueError, match="plain template takes one exchange"):
        load_llava_records(write_json(tmp_path / "p.json", plain), "plain")


# ------------------------------------------------------------------------------------------------------------ images


def _ramp_20x10() -> Image.Image:
    """20 wide, 10 high; column x has red = 10 * x, green 200, blue 0."""
    img = Image.new("RGB", (20, 10))
    img.putdata([(10 * x, 200, 0) for y in range(10) for x in range(20)])
    return img


def test_aspect_modes_on_a_20x10_image():
    img = _ramp_20x10()
    # pad: 5 rows of the processor's mean colour (LLaVA truncates: int(m * 255)) above and below, then the image.
    pad = image_transform(VisionConfig(img_h=20, img_w=20), "pad", normalize=False)(img)
    fill = torch.tensor([int(m * 255) for m in OPENAI_CLIP_MEAN], dtype=torch.float32) / 255
    assert pad.shape == (3, 20, 20)
    for rows in (slice(0, 5), slice(15, 20)):
        assert torch.allclose(pad[:, rows], fill[:, None, None].expand(3, 5, 20), atol=1e-6)
    assert torch.allclose(pad[0, 5:15, :], torch.arange(0, 200, 10.0).expand(10, 20) / 255, atol=1e-6)
    assert fill.mul(255).round().tolist() == [122, 116, 104]
    # keep: the short side fits, the long side is centre-cropped: columns 5..14 survive, undistorted.
    keep = image_transform(VisionConfig(img_h=10, img_w=10), "keep", normalize=False)(img)
    assert keep.shape == (3, 10, 10)
    assert torch.allclose(keep[0, 0], torch.arange(50, 150, 10.0) / 255, atol=1e-6)
    # square: the whole width squeezed into 10 columns, so both ends of the ramp are still there.
    square = image_transform(VisionConfig(img_h=10, img_w=10), "square", normalize=False)(img)
    assert square.shape == (3, 10, 10)
    assert square[0, 0, 0] < 30 / 255 and square[0, 0, -1] > 160 / 255
    assert torch.allclose(square[1], torch.full((10, 10), 200 / 255), atol=1 / 255)
    # Normalised output uses the vision config's mean and std.
    norm = image_transform(VisionConfig(img_h=20, img_w=20), "pad")(img)
    assert torch.allclose(norm[:, 0, 0], (fill - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(VISION.std), atol=1e-5)
    with pytest.raises(ValueError, match="image_aspect_ratio='crop' is not one of square, pad, keep"):
        image_transform(VISION, "crop")


def test_image_token_count():
    l14 = VisionConfig(img_h=224, img_w=224, patch_dim=14, class_token_length=1)
    assert image_token_count(l14) == 256
    assert image_token_count(l14, use_im_start_end=True) == 258
    assert image_token_count(l14, class_token_length=0) == 257  # the class token kept
    assert image_token_count(VisionConfig(img_h=32, img_w=48, patch_dim=8, class_token_length=0)) == 24
    with pytest.raises(ValueError, match="the vision tower has 1 class token"):
        image_token_count(l14, class_token_length=2)


# ------------------------------------------------------------------------------------------------------------ dataset


def test_items_and_collate_padding(tmp_path, tok):
    Image.new("RGB", (24, 16), (255, 0, 0)).save(tmp_path / "red.png")
    samples = [
        {"id": "img", "image": "red.png", "conversations": chat("What colour is the shape?", "red")},
        {"id": "txt", "conversations": chat("Describe the image.", "a blue circle and a green square", image=False)},
    ]
    ds = make_dataset(tmp_path, tok, samples)
    a, b = ds[0], ds[1]
    assert a["id"] == "img" and a["image"].shape == (3, 16, 16) and b["image"] is None
    assert (a["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1 and (b["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 0
    collate = LlavaCollator(pad_token_id=tok.pad_token_id, image_size=(16, 16), pad_to_multiple_of=8)
    batch = collate([a, b])
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    t = batch["input_ids"].shape[1]
    assert t == -(-max(la, lb) // 8) * 8 and t % 8 == 0
    assert batch["attention_mask"].sum(1).tolist() == [la, lb]
    assert batch["attention_mask"].dtype == torch.long
    for row, n in enumerate((la, lb)):
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][row, :n], [a, b][row]["input_ids"])
    assert batch["images"].shape == (2, 3, 16, 16)
    assert batch["image_present"].tolist() == [True, False]
    assert torch.equal(batch["images"][0], a["image"]) and not batch["images"][1].any()
    assert batch["ids"] == ["img", "txt"]
    decoded = tok.decode([i for i in batch["labels"][1].tolist() if i != IGNORE_INDEX], skip_special_tokens=False)
    assert decoded == " a blue circle and a green square</s>"


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, tok, caplog):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.png").write_bytes(b"<html>not an image</html>")
    samples = [
        {"id": "s0", "image": "ok.png", "conversations": chat("Colour?", "blue")},
        {"id": "s1", "image": "junk.png", "conversations": chat("Colour?", "blue")},
        {"id": "s2", "image": "gone.png", "conversations": chat("Colour?", "blue")},
        {"id": "s3", "image": "cut.png", "conversations": chat("Colour?", "blue")},
        {"id": "s4", "image": "ok.png", "conversations": chat("Colour?", "blue")},
    ]
    ds = make_dataset(tmp_path, tok, samples)
    with caplog.at_level(logging.WARNING, logger="vlkit.data.llava"):
        assert ds[1]["id"] == "s4"  # s1, s2, s3 are replaced by the next usable sample
    assert sum(ds.stats.values()) == 3 and ds.stats["image_missing"] == 1 and ds.stats == ds.skipped
    assert set(ds.stats) <= {"image_missing", "image_unidentified", "image_truncated", "image_corrupt"}
    for sid in ("s1", "s2", "s3"):
        assert f"(id '{sid}')" in caplog.text
    # A whole epoch runs; the skips are counted once each, and the loader reports them.
    loader = LlavaLoader(ds, 2, LlavaCollator(tok.pad_token_id, (16, 16)), shuffle=False, drop_last=False)
    ids = [i for batch in loader for i in batch["ids"]]
    assert ids == ["s0", "s4", "s4", "s4", "s4"]
    assert loader.counters() == {"skipped": ds.stats, "repaired": {}} and sum(ds.stats.values()) == 3
    # Counts live in shared memory: what a DataLoader worker process met is seen here.
    fresh = make_dataset(tmp_path, tok, samples)
    workers = LlavaLoader(fresh, 2, LlavaCollator(tok.pad_token_id, (16, 16)), shuffle=False, num_workers=1)
    assert [i for batch in workers for i in batch["ids"]] == ["s0", "s4", "s4", "s4"]
    assert fresh.stats == ds.stats
    broken = make_dataset(tmp_path, tok, samples[1:4])
    with pytest.raises(RuntimeError, match="none of the 3 samples can be used"):
        broken[0]


def test_truncation_after_splicing_and_all_masked(tmp_path, tok):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    samples = [{"id": "long", "image": "a.png", "conversations": chat("What colour is the shape?", "red")}]
    full = make_dataset(tmp_path, tok, samples)[0]
    n = len(full["input_ids"])
    answer = int((full["labels"] != IGNORE_INDEX).sum())  # "Ġred" and "</s>"
    assert answer == 2
    # The spliced length is n - 1 + 4: a context one position shorter cuts the last text token (the </s>).
    cut = make_dataset(tmp_path, tok, samples, max_length=n + IMAGE_TOKENS - 2)
    item = cut[0]
    assert len(item["input_ids"]) == n - 1 and len(item["input_ids"]) - 1 + IMAGE_TOKENS == cut.max_length
    assert cut.stats == {"truncated": 1}
    # A context that ends before the answer: kept, fully masked, counted; strict mode refuses it.
    masked = make_dataset(tmp_path, tok, samples, max_length=n + IMAGE_TOKENS - 1 - answer)
    assert (masked[0]["labels"] == IGNORE_INDEX).all()
    assert masked.stats == {"all_masked": 1, "truncated": 1}
    strict = make_dataset(tmp_path, tok, samples, max_length=n + IMAGE_TOKENS - 1 - answer, strict=True)
    with pytest.raises(ValueError, match=r"data.json sample 0 \(id 'long'\): no supervised token \(the context ends"):
        strict[0]
    # A context shorter than the image's positions: the sample cannot be used at all.
    too_long = make_dataset(tmp_path, tok, samples + samples, max_length=IMAGE_TOKENS + 1, image_tokens=IMAGE_TOKENS)
    with pytest.raises(RuntimeError, match="none of the 2 samples"):
        too_long[0]
    assert too_long.stats == {"too_long": 2}


def test_mismatched_samples_are_kept_masked_and_counted(tmp_path):
    """A tokenizer whose merges cross the template's boundary (": r" in "ASSISTANT: red"): the sample is fully
    masked and counted in the dataset's stats, the other sample is untouched."""
    from tokenizers import Tokenizer, models

    from vlkit.data.conversation import ALL_SPECIAL_TOKENS
    from vlkit.data.tokenizer import HFTokenizer

    vocab = {t: i for i, t in enumerate(ALL_SPECIAL_TOKENS)}
    for c in sorted(set("".join(template_texts()) + "Colour? red blue")):
        vocab.setdefault(c, len(vocab))
    vocab.update({": ": len(vocab), ": r": len(vocab) + 1})
    bpe = Tokenizer(models.BPE(vocab, [(":", " "), (": ", "r")], unk_token="<unk>"))
    bpe.add_special_tokens(list(ALL_SPECIAL_TOKENS))
    samples = [{"id": c, "conversations": chat("Colour?", c, image=False)} for c in ("red", "blue")]
    ds = make_dataset(tmp_path, HFTokenizer(bpe), samples, lazy_preprocess=False)
    assert (ds[0]["labels"] == IGNORE_INDEX).all() and (ds[1]["labels"] != IGNORE_INDEX).sum() == 5  # blue</s>
    assert ds.stats == {"tokenization_mismatch": 1, "all_masked": 1} and ds.skipped == {}
    assert ds.tokenizer.counts["tokenization_mismatch"] == 1


def test_lazy_and_eager_preprocessing_agree(tmp_path, tok):
    samples = [{"id": str(i), "conversations": chat(f"Question {i}?", "red " * i, image=False)} for i in range(4)]
    lazy = make_dataset(tmp_path, tok, samples)
    eager = make_dataset(tmp_path, tok, samples, lazy_preprocess=False)
    for i in range(4):
        assert torch.equal(lazy[i]["input_ids"], eager[i]["input_ids"])
        assert torch.equal(lazy[i]["labels"], eager[i]["labels"])


def test_loader_shards_shuffles_and_resumes(tmp_path, tok):
    samples = [{"id": f"t{i}", "conversations": chat(f"Q{i}?", "a", image=False)} for i in range(10)]
    ds = make_dataset(tmp_path, tok, samples)
    collate = LlavaCollator(tok.pad_token_id, (16, 16))
    ranks = [LlavaLoader(ds, 2, collate, seed=3, rank=r, world_size=2, drop_last=False) for r in range(2)]
    seen = [[i for b in loader for i in b["ids"]] for loader in ranks]
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == sorted(s["id"] for s in samples)
    assert seen[0] + seen[1] != [s["id"] for s in samples]  # shuffled
    assert ranks[0].epoch == 1 and len(ranks[0]) == 3
    # Resume after 2 batches of epoch 1: the rest of the epoch is what an uninterrupted run gets.
    a = LlavaLoader(ds, 2, collate, seed=3)
    a.epoch = 1
    it = iter(a)
    consumed = [next(it)["ids"], next(it)["ids"]]
    state = a.state_dict()
    rest = [b["ids"] for b in it]
    b = LlavaLoader(ds, 2, collate, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert [x["ids"] for x in b] == rest and len(consumed) + len(rest) == 5
    with pytest.raises(ValueError, match="saved batch_size=2, this loader has 4"):
        LlavaLoader(ds, 4, collate, seed=3).load_state_dict(state)


# ------------------------------------------------------------------------------------------------------------ config


def test_build_from_config_and_config_keys(tmp_path, tok):
    Image.new("RGB", (30, 10), (0, 255, 0)).save(tmp_path / "g.png")
    path = write_json(
        tmp_path / "train.json", [{"id": "g", "image": "g.png", "conversations": chat("Colour?", "green")}]
    )
    data = DataConfig(kind="llava", train_path=path, image_aspect_ratio="pad", sep_image_conv_front=True)
    ds = build_llava_dataset(data, "train", tok, VISION, context_length=512, image_tokens=IMAGE_TOKENS,
                             default_template="llama_3")  # fmt: skip
    assert ds.tokenizer.template.name == "llama_3" and ds.max_length == 512
    assert ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="data.val_path is not set"):
        build_llava_dataset(data, "val", tok, VISION, context_length=64, image_tokens=IMAGE_TOKENS)
    with pytest.raises(ValueError, match="data.conv_template is not set"):
        build_llava_dataset(data, "train", tok, VISION, context_length=64, image_tokens=IMAGE_TOKENS)
    cfg = load_config("clip-tiny", ["data.conv_template=nvgpt", "data.image_aspect_ratio=keep", "data.image_folder=/x"])
    assert (cfg.data.conv_template, cfg.data.image_aspect_ratio, cfg.data.image_folder) == ("nvgpt", "keep", "/x")
    assert cfg.data.is_multimodal and cfg.data.lazy_preprocess and not cfg.data.sep_image_conv_front
    with pytest.raises(ConfigError, match="data.conv_template='vicuna'"):
        load_config("clip-tiny", ["data.conv_template=vicuna"])
    with pytest.raises(ConfigError, match="data.image_aspect_ratio='crop'"):
        load_config("clip-tiny", ["data.image_aspect_ratio=crop"])
