import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.data.shapes import balanced_labels, make_sample, write_shapes_dataset
from vlkit.data.shapes_render import (
    BACKGROUND_WORDS,
    PALETTE,
    POSITION_PHRASES,
    SIZE_WORDS,
    TEMPLATES,
    coverage,
    heldout_combos,
    render,
)

SEED = 3


def _write(out: Path, **kwargs) -> dict:
    args = {"train": 100, "val": 50, "seed": SEED, "shard_size": 40, "progress": False} | kwargs
    return write_shapes_dataset(out, **args)


def _read_split(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, _write(out)


@pytest.fixture(scope="module")
def samples(dataset) -> dict[str, dict[str, dict[str, bytes]]]:
    out, _ = dataset
    return {split: _read_split(out / split) for split in ("train", "val")}


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path, dataset):
    out, _ = dataset
    _write(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)
    _write(tmp_path / "other", seed=SEED + 1)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(out).keys()
    assert other["train/000000.tar"] != _files(out)["train/000000.tar"]
    assert json.loads(other["classes.json"])["classes"] == json.loads(_files(out)["classes.json"])["classes"]


def test_output_does_not_depend_on_workers_or_shard_size(tmp_path):
    _write(tmp_path / "one", train=30, val=10, shard_size=10, workers=1)
    _write(tmp_path / "two", train=30, val=10, shard_size=10, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    _write(tmp_path / "big", train=30, val=10, shard_size=7, workers=1)
    for split in ("train", "val"):
        assert _read_split(tmp_path / "one" / split) == _read_split(tmp_path / "big" / split)


def test_shard_members_are_complete_sorted_and_fixed(dataset):
    out, summary = dataset
    assert [Path(p).name for p in summary["splits"]["train"]["shards"]] == ["000000.tar", "000001.tar", "000002.tar"]
    for shard in sorted(out.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert all(
            "/" not in n and m.isfile() and m.mtime == members[0].mtime and m.uid == 0 for n, m in zip(names, members)
        )
        by_key = Counter(n.split(".", 1)[0] for n in names)
        assert set(by_key.values()) == {4}
        assert {n.split(".", 1)[1] for n in names} == {"cls", "jpg", "json", "txt"}


def test_sizes_json_counts_the_members(dataset):
    out, _ = dataset
    for split, expected in (("train", {"000000.tar": 40, "000001.tar": 40, "000002.tar": 20}), ("val", None)):
        sizes = json.loads((out / split / "sizes.json").read_text())
        if expected:
            assert sizes == expected
        for name, count in sizes.items():
            with tarfile.open(out / split / name) as tar:
                assert len(tar.getmembers()) == 4 * count
        assert sorted(sizes) == sorted(p.name for p in (out / split).glob("*.tar"))
    assert sum(json.loads((out / "val" / "sizes.json").read_text()).values()) == 50


def test_classes_json_has_sorted_classes_and_templates(dataset):
    out, summary = dataset
    meta = json.loads((out / "classes.json").read_text())
    assert len(meta["classes"]) == 25 and meta["classes"] == sorted(meta["classes"])
    assert meta["classes"][0] == "blue circle" and summary["classes"] == meta["classes"]
    assert meta["templates"] == list(TEMPLATES) and all(t.count("{}") == 1 for t in meta["templates"])
    assert meta["folders"] == [c.replace(" ", "_") for c in meta["classes"]]


def test_captions_labels_and_metadata_agree(dataset, samples):
    out, _ = dataset
    classes = json.loads((out / "classes.json").read_text())["classes"]
    seen_mentions = Counter()
    for split, by_key in samples.items():
        for key, files in by_key.items():
            meta, text, label = json.loads(files["json"]), files["txt"].decode(), int(files["cls"])
            name = f"{meta['color']} {meta['shape']}"
            assert meta["key"] == key and meta["split"] == split and meta["caption"] == text
            assert meta["class"] == name == classes[label] and meta["label"] == label
            assert name in text
            mentions = set(meta["caption_mentions"])
            seen_mentions.update(mentions)
            if "size" in mentions:
                assert any(f"{w} {name}" in text for w in SIZE_WORDS[meta["size"]])
            else:
                assert not any(f"{w} {name}" in text for words in SIZE_WORDS.values() for w in words)
            if "position" in mentions:
                assert any(p in text for p in POSITION_PHRASES[meta["position"]])
            if "background" in mentions:
                assert any(f"{w} background" in text for w in BACKGROUND_WORDS[meta["background"]])
            else:
                assert "background" not in text
            second = meta["second"]
            if second is not None:
                assert second["size"] == "small" and meta["size"] != "small"
                assert (second["shape"], second["color"]) != (meta["shape"], meta["color"])
                assert second["shape"] != meta["shape"] and second["color"] != meta["color"]
            if "second" in mentions:
                assert f"{second['color']} {second['shape']}" in text
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    assert {"size", "position", "background", "second"} <= set(seen_mentions)


def test_classes_are_balanced(dataset, samples):
    for split, per_class in (("train", 4), ("val", 2)):
        counts = Counter(int(f["cls"]) for f in samples[split].values())
        assert sorted(counts) == list(range(25)) and set(counts.values()) == {per_class}
        assert set(dataset[1]["splits"][split]["per_class"].values()) == {per_class}
    counts = np.bincount(balanced_labels(103, 25, seed=0, split="train"), minlength=25)
    assert counts.min() == 4 and counts.max() == 5 and counts.sum() == 103


def test_val_split_is_held_out(samples):
    train, val = samples["train"], samples["val"]
    assert not set(train) & set(val)
    assert not {f["jpg"] for f in train.values()} & {f["jpg"] for f in val.values()}
    # Same index, other split: another seed stream, so another scene.
    assert make_sample(SEED, "train", 0, 0)[0] != make_sample(SEED, "val", 0, 0)[0]
    combos = set(heldout_combos())
    assert all(
        (json.loads(f["json"])["background"], json.loads(f["json"])["position"]) not in combos for f in train.values()
    )
    pairs = [make_sample(SEED, "val", i, i % 25)[0] for i in range(400)]
    unseen = [s for s in pairs if (s.background, s.main.position) in combos]
    assert 20 < len(unseen) < 100 and all(s.heldout_combo for s in unseen)
    train_scenes = [make_sample(SEED, "train", i, i % 25)[0] for i in range(400)]
    assert not any((s.background, s.main.position) in combos for s in train_scenes)


def _nearest_color(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name], float) - rgb) ** 2)))


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_main_object_pixels_have_the_named_color(samples):
    for split, by_key in samples.items():
        for key, files in by_key.items():
            meta = json.loads(files["json"])
            index = int(key.split("_")[1])
            scene = make_sample(SEED, split, index, meta["label"])[0]
            img = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"), dtype=float)
            # The scene re-created from (seed, split, index) is what the shard holds, up to JPEG error.
            assert np.abs(img - np.asarray(render(scene, 32), float)).mean() < 3.0
            background = np.asarray(render(scene, 32, objects=False), dtype=float)
            changed = np.abs(img - background).sum(axis=2) > 60
            if scene.second is not None:
                changed &= coverage(scene.second, 32) == 0
            main_cov = coverage(scene.main, 32)
            inside = main_cov > 0.5
            assert (changed & inside).sum() >= 0.8 * inside.sum()
            assert not (changed & ~_dilate(main_cov > 0)).any()  # one pixel of slack for JPEG ringing
            x0, y0, x1, y1 = meta["bbox"]
            assert main_cov[y0:y1, x0:x1].sum() == pytest.approx(main_cov.sum())
            assert _nearest_color(img[changed].mean(axis=0)) == meta["color"], key


def test_background_colors_are_far_from_shape_colors(samples):
    # Backgrounds are muted: their pixels must never read as one of the class colours.
    for split, by_key in samples.items():
        for key, files in list(by_key.items())[:20]:
            scene = make_sample(SEED, split, int(key.split("_")[1]), json.loads(files["json"])["label"])[0]
            bg = np.asarray(render(scene, 32, objects=False), dtype=float).reshape(-1, 3)
            saturation = (bg.max(axis=1) - bg.min(axis=1)) / np.maximum(bg.max(axis=1), 1)
            assert saturation.max() < 0.3


def test_classification_layout(tmp_path):
    summary = _write(tmp_path, train=50, val=25, classification=True)
    meta = json.loads((tmp_path / "classes.json").read_text())
    for split, per_class in (("train", 2), ("val", 1)):
        folders = sorted(p.name for p in (tmp_path / split).iterdir())
        # torchvision's ImageFolder numbers the sorted folder names: that must be the classes.json order.
        assert folders == meta["folders"] == [c.replace(" ", "_") for c in meta["classes"]]
        for label, folder in enumerate(folders):
            images = sorted((tmp_path / split / folder).glob("*.png"))
            assert len(images) == per_class
            with Image.open(images[0]) as img:
                assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"
            assert make_sample(SEED, split, int(images[0].stem.split("_")[1]), label)[0].main.color in folder
    assert summary["format"] == "imagefolder" and meta["format"] == "imagefolder"
    assert not list(tmp_path.glob("*/*.tar")) and not list(tmp_path.glob(".shapes-staging-*"))


def test_rewriting_replaces_earlier_output(tmp_path):
    _write(tmp_path, train=60, val=10, shard_size=20)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 3
    _write(tmp_path, train=20, val=10, shard_size=20)
    assert [p.name for p in (tmp_path / "train").glob("*.tar")] == ["000000.tar"]
    assert not list(tmp_path.glob(".shapes-staging-*"))


def test_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="did not write"):
        _write(tmp_path)
    assert main(["data", "shapes", "--out", str(tmp_path), "--train", "5", "--val", "5", "--quiet"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "train" / "precious.jpg").exists()


def test_custom_shapes_and_colors(tmp_path):
    summary = _write(
        tmp_path, train=12, val=6, shapes=["heart", "hexagon"], colors=["orange", "cyan", "white"], size=48
    )
    assert summary["classes"] == sorted(f"{c} {s}" for c in ("orange", "cyan", "white") for s in ("heart", "hexagon"))
    files = _read_split(tmp_path / "train")
    assert Image.open(io.BytesIO(next(iter(files.values()))["jpg"])).size == (48, 48)
    captions = [f["txt"].decode() for f in files.values()]
    assert not any(re.search(r"\ba (orange|heart|hexagon)", c) for c in captions)  # "an orange heart", not "a orange"


def test_command_writes_dataset_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(["data", "shapes", "--out", str(out), "--train", "25", "--val", "25", "--shard-size", "10", "--quiet"])
        == 0
    )
    text = capsys.readouterr().out
    assert "25 train + 25 val" in text and "25 classes" in text and str(out / "classes.json") in text
    assert json.loads((out / "train" / "sizes.json").read_text()) == {
        "000000.tar": 10,
        "000001.tar": 10,
        "000002.tar": 5,
    }
    assert main(["data", "shapes", "--out", str(out), "--train", "5", "--val", "5", "--json", "--seed", "9"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 9 and summary["splits"]["train"]["samples"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train", "0"], "--train"),
        (["--val", "-3"], "--val"),
        (["--size", "4"], "--size"),
        (["--size", "big"], "--size"),
        (["--seed", "-1"], "--seed"),
        (["--shard-size", "0"], "--shard-size"),
        (["--shapes", "circle,blob"], "blob"),
        (["--colors", ""], "--colors"),
        (["--second-prob", "2"], "--second-prob"),
        ([], "--out"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, message):
    out = [] if not args else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(["data", "shapes", *out, *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "train").exists()


def test_api_rejects_bad_values(tmp_path):
    for kwargs in ({"train": 0}, {"size": 4}, {"shapes": ["blob"]}, {"colors": ["red", "red"]}, {"workers": 0}):
        with pytest.raises(ValueError):
            _write(tmp_path, **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        _write(tmp_path / "file")
