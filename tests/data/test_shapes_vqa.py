"""vlkit data shapes-vqa: deterministic LLaVA instruction data from the shapes scenes, answers that match the scenes,
a tokenizer that serves every template without mismatches, and the command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.config.schema import VisionConfig
from vlkit.data.conversation import ALL_SPECIAL_TOKENS, TEMPLATES, ConversationTokenizer
from vlkit.data.llava import LlavaDataset, image_token_count, image_transform, load_llava_records
from vlkit.data.shapes import balanced_labels, make_sample
from vlkit.data.shapes_render import DEFAULT_COLORS, DEFAULT_SHAPES, SIZES, class_names
from vlkit.data.shapes_vqa import write_shapes_vqa
from vlkit.data.tokenizer import get_tokenizer

SMALL = {"train": 30, "val": 6, "size": 16, "progress": False}


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa")
    write_shapes_vqa(out, seed=7, **SMALL)
    return out


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    write_shapes_vqa(tmp_path / "again", seed=7, **SMALL)
    first, again = digest(data), digest(tmp_path / "again")
    assert first == again
    assert len([f for f in first if f.endswith(".png")]) == 36
    assert {"dataset.json", "tokenizer/tokenizer.json", "pretrain_train.json", "instruct_val.json"} <= set(first)
    write_shapes_vqa(tmp_path / "other", seed=8, **SMALL)
    other = digest(tmp_path / "other")
    assert other["instruct_train.json"] != first["instruct_train.json"]
    assert other["images/train/train_0000000.png"] != first["images/train/train_0000000.png"]
    assert not list((tmp_path / "again").glob(".shapes-vqa-staging-*"))


def test_records_match_the_scenes(data):
    index = json.loads((data / "dataset.json").read_text())
    assert index["generator"] == "vlkit data shapes-vqa" and index["samples"] == {"train": 30, "val": 6}
    classes = class_names(DEFAULT_SHAPES, DEFAULT_COLORS)
    answers_seen = set()
    for split in ("train", "val"):
        labels = balanced_labels(SMALL[split], len(classes), 7, split).tolist()
        pretrain = load_llava_records(data / f"pretrain_{split}.json", "plain")
        instruct = load_llava_records(data / f"instruct_{split}.json", "vicuna_v1")
        assert [r.id for r in pretrain] == [r.id for r in instruct] == [f"{split}_{i:07d}" for i in range(len(labels))]
        for i, (pre, ins) in enumerate(zip(pretrain, instruct)):
            scene, caption, _ = make_sample(7, split, i, labels[i])  # the scene of `vlkit data shapes` (seed 7)
            assert pre.turns[1].text == caption and pre.turns[0].text.startswith("<image>\n")
            assert Image.open(data / ins.image).size == (16, 16)
            assert 2 <= len(ins.turns) <= 6 and ins.turns[0].text.startswith("<image>\n")
            for question, reply in zip(ins.turns[::2], ins.turns[1::2]):
                q = question.text.removeprefix("<image>\n")
                if q in ("What colour is the shape?", "What color is the shape?", "What colour is the main object?"):
                    assert reply.text == scene.main.color
                    answers_seen.add("color")
                elif q in ("What shape is it?", "What shape is shown?", "Which shape is in the image?"):
                    assert reply.text == scene.main.shape
                    answers_seen.add("shape")
                elif q.startswith("How many"):
                    assert reply.text == ("two" if scene.second is not None else "one")
                elif q.startswith("Is the shape "):
                    assert reply.text == ("yes" if q == f"Is the shape {scene.main.color}?" else "no")
                elif q.startswith(("How big", "What size")):
                    assert reply.text in SIZES and reply.text == scene.main.size
                elif q.startswith(("Describe", "What does the image show")):
                    assert reply.text == caption
    assert answers_seen == {"color", "shape"}


def test_tokenizer_serves_every_template_without_mismatch(data):
    tok = get_tokenizer(data / "tokenizer")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3) and tok.vocab_size == 512
    for special in ALL_SPECIAL_TOKENS:
        assert tok.encode(special) == [tok.tokenizer.token_to_id(special)]
    assert tok.decode(tok.encode("a Big purple star, 3 times!")) == "a Big purple star, 3 times!"  # byte-level
    vision = VisionConfig(img_h=16, img_w=16, patch_dim=8)
    for name in TEMPLATES:
        ct = ConversationTokenizer(tok, name)
        source = "pretrain" if name == "plain" else "instruct"
        ds = LlavaDataset(data / f"{source}_train.json", ct, image_transform(vision, "pad"), max_length=2048,
                          image_tokens=image_token_count(vision), lazy_preprocess=False)  # fmt: skip
        assert ct.counts["samples"] == 30 and ct.counts["tokenization_mismatch"] == 0
        assert ct.counts["all_masked"] == 0 and ds.stats == {}


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "shapes-vqa", "--out", str(out), "--train", "4", "--val", "2", "--size", "16",
                 "--no-tokenizer", "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == {"train": 4, "val": 2} and summary["tokenizer"] is None
    assert Path(summary["instruct"]["train"]).is_file() and not (out / "tokenizer").exists()
    # Rewriting its own output is fine; someone else's files of the same names are refused.
    assert main(["data", "shapes-vqa", "--out", str(out), "--train", "2", "--val", "1", "--quiet"]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    assert main(["data", "shapes-vqa", "--out", str(foreign), "--train", "2", "--quiet"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert main(["data", "shapes-vqa", "--out", str(out), "--vocab-size", "100", "--quiet"]) == 2
    with pytest.raises(SystemExit):
        main(["data", "shapes-vqa", "--out", str(out), "--colors", "red,mauve"])
