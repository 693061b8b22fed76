"""CSV/TSV image-caption source: columns, delimiters, relative paths, bad rows, resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data.csvdata import CsvDataset, build_csv_loader, read_rows, sniff_delimiter


def transform(img):
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float()


def tokenizer(captions):
    return torch.zeros(len(captions), 77, dtype=torch.long)


def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12, 10), (i * 20 % 256, 0, 0)).save(folder / f"{i}.png")


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def keys_and_captions(ld):
    out = []
    for b in ld:
        out += list(zip(b["key"], b["caption"]))
    return out


def test_csv_with_relative_paths_and_bad_rows(tmp_path):
    make_images(tmp_path / "img", 6)
    csv_file = write(
        tmp_path / "list.csv",
        [
            "filepath,title,extra",
            "img/0.png,a red square,x",
            'img/1.png,"a caption, with a comma",x',
            "img/2.png",  # too few columns
            ",no image path,x",  # empty path
            "img/missing.png,a missing file,x",
            f"{tmp_path / 'img' / '3.png'},absolute path,x",
            "img/4.png,,x",  # empty caption
            "img/5.png,last one,x",
        ],
    )
    ld = build_csv_loader(csv_file, batch_size=2, image_transform=transform, tokenizer=tokenizer, num_workers=0)
    got = dict(keys_and_captions(ld))
    assert sorted(got.values()) == ["a caption, with a comma", "a red square", "absolute path", "last one"]
    m = ld.metrics
    assert m["skipped"] == {"bad_row": 2, "missing_file": 1, "empty_caption": 1}
    assert m["samples"] == 4
    assert ld.dataset.bad_rows == 2


def test_tsv_columns_by_name_and_sniffing(tmp_path):
    make_images(tmp_path / "img", 3)
    tsv = write(tmp_path / "list.tsv", ["caption\tjpg_path", "one\timg/0.png", "two\timg/1.png", "three\timg/2.png"])
    assert sniff_delimiter(tsv) == "\t"
    odd = write(tmp_path / "list.txt", ["a;b", "img/0.png;zero"])
    assert sniff_delimiter(odd) == ";"
    with pytest.raises(ValueError, match="image column"):
        read_rows(tsv)  # 'jpg_path' is not a known image column name
    ld = build_csv_loader(
        tsv, batch_size=3, image_transform=transform, tokenizer=tokenizer, num_workers=0, image_col="jpg_path"
    )
    (batch,) = list(ld)
    assert sorted(batch["caption"]) == ["one", "three", "two"]
    assert batch["image"].shape == (3, 3, 8, 8) and batch["text"].shape == (3, 77)
    with pytest.raises(ValueError, match="no caption column 'nope'"):
        read_rows(tsv, image_col="jpg_path", caption_col="nope")


def test_csv_labels_and_resume(tmp_path):
    make_images(tmp_path / "img", 10)
    rows = ["filepath,title,label"] + [f"img/{i}.png,photo {i},{i % 2}" for i in range(10)]
    csv_file = write(tmp_path / "list.csv", rows)

    def make():
        ds = CsvDataset(
            csv_file,
            batch_size=3,
            image_transform=transform,
            tokenizer=tokenizer,
            label_col="label",
            rows_per_part=4,
            shuffle_buffer=3,
        )
        from vlkit.data.stream import ShardLoader

        return ShardLoader(ds, num_workers=0)

    full = [b["key"] for b in make()]
    first = make()
    it = iter(first)
    seen = [next(it)["key"] for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    assert seen + [b["key"] for b in second] == full
    b = next(iter(make()))
    assert b["label"].tolist() == [int(k) % 2 for k in b["key"]]
