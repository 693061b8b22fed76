"""``vlkit data from-folder`` / ``from-csv``: shards + sizes.json that the loader reads back; atomic shard writing."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.cli import main
from vlkit.data.shards import build_shard_loader
from vlkit.data.write import ShardWriter, from_folder


def transform(img):
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float()


def read_back(out, **kw):
    ld = build_shard_loader(
        str(out), batch_size=4, image_transform=transform, tokenizer=None, num_workers=0, shuffle=False, **kw
    )
    return [s for b in ld for s in zip(b["key"], b.get("caption", [None] * len(b["key"])), b.get("label", b["key"]))]


def make_caption_folder(src):
    (src / "sub").mkdir(parents=True)
    for i in range(7):
        folder = src / "sub" if i % 2 else src
        Image.new("RGB", (16, 12), (i * 30, 0, 0)).save(folder / f"img{i}.jpg")
        if i != 6:
            (folder / f"img{i}.txt").write_text(f"caption number {i}\n")
    Image.new("RGBA", (8, 8), (0, 0, 255, 100)).save(src / "alpha.png")
    (src / "alpha.txt").write_text("a png")
    Image.new("RGB", (8, 8)).save(src / "old.bmp")
    (src / "old.txt").write_text("a bitmap")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (src / "broken.txt").write_text("broken")


def test_from_folder_with_sidecar_captions(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_caption_folder(src)
    code = main(["data", "from-folder", str(src), "--out", str(out), "--shard-size", "3", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["samples"] == 8 and summary["shards"] == 3 and summary["layout"] == "captions"
    skipped = dict(summary["skipped"])
    assert skipped.pop("no_caption") == 1  # img6 has no .txt
    assert list(skipped.values()) == [1] and set(skipped) <= {"corrupt", "truncated", "unidentified"}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 2}
    assert not list(out.glob("*.tmp"))
    captions = sorted(c for _, c, _ in read_back(out))
    assert captions == sorted([f"caption number {i}" for i in range(6)] + ["a png", "a bitmap"])
    with tarfile.open(out / "000000.tar") as tar:
        names = tar.getnames()
    # Sorted sources (alpha.png first), sequential keys, PNG kept as PNG, BMP re-encoded as PNG.
    assert names[:4] == ["000000000.png", "000000000.txt", "000000000.json", "000000001.jpg"]
    with tarfile.open(out / "000001.tar") as tar:
        assert "000000004.png" in tar.getnames()  # old.bmp
    # Refuses to mix with existing shards unless told to.
    assert main(["data", "from-folder", str(src), "--out", str(out)]) == 2
    assert main(["data", "from-folder", str(src), "--out", str(out), "--overwrite", "--shard-size", "100"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]


def test_from_folder_with_class_folders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for c, name in enumerate(["cat", "dog", "hot_dog"]):
        (src / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 10), (c * 80, i, 0)).save(src / name / f"{i}.png")
    summary = from_folder(src, out, progress=False)
    assert summary["layout"] == "classes" and summary["samples"] == 6
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["cat", "dog", "hot_dog"]}
    samples = read_back(out, label_key="cls")
    assert sorted((c, int(label)) for _, c, label in samples) == [
        ("cat", 0),
        ("cat", 0),
        ("dog", 1),
        ("dog", 1),
        ("hot dog", 2),
        ("hot dog", 2),
    ]


def test_from_csv(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    csv_file = tmp_path / "list.tsv"
    csv_file.write_text(
        "filepath\ttitle\nimg/0.jpg\tzero\nimg/1.jpg\tone\nimg/9.jpg\tmissing\nbad row\nimg/2.jpg\ttwo\n"
    )
    out = tmp_path / "out"
    assert main(["data", "from-csv", str(csv_file), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 3 and summary["skipped"] == {"missing_file": 1, "bad_row": 1}
    assert sorted(c for _, c, _ in read_back(out)) == ["one", "two", "zero"]
    assert main(["data", "from-csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o2")]) == 2


def test_shard_writer_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), ShardWriter(out, shard_size=2) as writer:
        for i in range(3):
            writer.write(f"{i:03d}", {"txt": b"x"})
        assert (out / "000001.tar.tmp").exists() and not (out / "000001.tar").exists()
        raise RuntimeError("crash while writing the second shard")
    # The finished shard is there under its final name; the half-written one left no file behind.
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar"]
    with tarfile.open(out / "000000.tar") as tar:
        assert tar.getnames() == ["000.txt", "001.txt"]
