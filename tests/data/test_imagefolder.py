"""vlkit.data.imagefolder: class indices, the class index file, skipped bad images, symlinks kept inside the root."""

import io
import json
import logging
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlkit.config.schema import VisionConfig
from vlkit.data.imagefolder import ImageFolder, read_class_index, write_class_index
from vlkit.data.transforms import get_transform

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "zebra": (0, 0, 255)}


def image_bytes(colour, fmt="PNG", size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    """root/train: cat (2 + nested 1), dog (2 + notes), zebra (1); root/val: cat and zebra only (no dog)."""
    root = tmp_path / "root"
    put(root / "train/cat/a.png", image_bytes(COLOURS["cat"]))
    put(root / "train/cat/b.JPG", image_bytes(COLOURS["cat"], "JPEG"))
    put(root / "train/cat/nested/deeper/c.webp", image_bytes(COLOURS["cat"], "WEBP"))
    put(root / "train/dog/d.gif", image_bytes(COLOURS["dog"], "GIF"))
    put(root / "train/dog/e.bmp", image_bytes(COLOURS["dog"], "BMP"))
    put(root / "train/dog/notes.txt", b"not an image")
    put(root / "train/dog/.hidden.png", image_bytes(COLOURS["dog"]))
    put(root / "train/zebra/f.tiff", image_bytes(COLOURS["zebra"], "TIFF"))
    put(root / "val/cat/g.png", image_bytes(COLOURS["cat"]))
    put(root / "val/zebra/h.png", image_bytes(COLOURS["zebra"]))
    return root


def colour_of(pixels: torch.Tensor) -> tuple:
    return tuple(pixels[:, 0, 0].tolist())


def test_indices_sorted_and_every_format_found(tree):
    ds = ImageFolder(tree, "train")
    assert ds.classes == ["cat", "dog", "zebra"] and ds.class_to_idx == {"cat": 0, "dog": 1, "zebra": 2}
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert names == ["a.png", "b.JPG", "c.webp", "d.gif", "e.bmp", "f.tiff"]
    assert ds.targets == [0, 0, 0, 1, 1, 2]
    for i in range(len(ds)):
        pixels, label = ds[i]
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 10, 12)
        expected = COLOURS[ds.classes[label]]
        assert max(abs(a - b) for a, b in zip(colour_of(pixels), expected)) <= 3  # JPEG/WebP are lossy
    assert ds.skipped == {}


def test_class_index_file_keeps_train_and_val_agreeing(tree):
    # Without the file, val (no dog folder) would number zebra 1 instead of 2.
    assert ImageFolder(tree, "val").class_to_idx == {"cat": 0, "zebra": 1}
    path = ImageFolder(tree, "train").write_classes()
    assert path == tree.resolve() / "classes.json"
    assert json.loads(path.read_text()) == {"classes": ["cat", "dog", "zebra"]}
    val = ImageFolder(tree, "val")
    assert val.classes == ["cat", "dog", "zebra"] and val.targets == [0, 2]
    # A split's own file wins over the root's.
    write_class_index(tree / "val" / "classes.json", ["zebra", "cat"])
    own = ImageFolder(tree, "val")
    assert {os.path.basename(p): t for p, t in own.samples} == {"h.png": 0, "g.png": 1}


def test_class_index_with_folder_names_and_extra_keys(tree, tmp_path):
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"classes": ["a cat", "a dog", "a zebra"], "folders": ["cat", "dog", "zebra"],
                                 "templates": ["a photo of {}."]}))  # fmt: skip
    ds = ImageFolder(tree, "train", classes=index)
    assert ds.classes == ["a cat", "a dog", "a zebra"] and ds.folders == ["cat", "dog", "zebra"]
    assert ds.targets == [0, 0, 0, 1, 1, 2]
    written = ds.write_classes(tmp_path / "out.json", templates=["{}"])
    assert read_class_index(written) == (["a cat", "a dog", "a zebra"], ["cat", "dog", "zebra"])
    index.write_text(json.dumps(["cat", "dog", "zebra"]))  # a bare list is an index too
    assert ImageFolder(tree, "train", classes=index).classes == ["cat", "dog", "zebra"]


def test_unknown_folder_and_unsafe_names_rejected(tree, tmp_path):
    with pytest.raises(ValueError, match="not in the class index"):
        ImageFolder(tree, "train", classes=["cat", "dog"])
    for bad in (["cat", "../val/cat"], ["cat", "cat"], ["", "dog"]):
        with pytest.raises(ValueError):
            ImageFolder(tree, "train", classes=bad)
    index = tmp_path / "bad.json"
    index.write_text(json.dumps({"classes": ["x"], "folders": [".."]}))
    with pytest.raises(ValueError, match="plain directory name"):
        read_class_index(index)
    with pytest.raises(ValueError, match="outside"):
        ImageFolder(tree / "train", "../val")


def test_bad_images_skipped_counted_and_named(tree, caplog):
    put(tree / "train/cat/broken.jpg", b"\xff\xd8\xff" + b"garbage" * 20)
    put(tree / "train/dog/empty.png", b"")
    truncated = image_bytes(COLOURS["dog"], "JPEG", size=(64, 64))
    put(tree / "train/dog/half.jpeg", truncated[: len(truncated) // 2])
    ds = ImageFolder(tree, "train", transform=get_transform(VisionConfig(img_h=8, img_w=8), train=False))
    assert len(ds) == 9  # found by name; judged when read
    with caplog.at_level(logging.WARNING, logger="vlkit.data.imagefolder"):
        items = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # a known-bad file is neither decoded nor warned about again
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert ds.skipped == {"corrupt": 1, "empty": 1, "truncated": 1}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3
    assert any("broken.jpg" in m and "corrupt" in m for m in warned)
    assert any("empty.png" in m and "empty" in m for m in warned)
    # A bad index yields the next good sample, with that sample's label.
    index = {os.path.basename(p): i for i, (p, _) in enumerate(ds.samples)}
    assert items[index["broken.jpg"]][1] == ds.targets[index["broken.jpg"] + 1]
    assert [label for _, label in again] == [label for _, label in items]


def test_skips_seen_by_the_main_process_through_workers(tree):
    put(tree / "train/zebra/bad.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ds = ImageFolder(tree, "train", transform=get_transform(VisionConfig(img_h=8, img_w=8), train=False))
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == len(ds) == 7
    assert ds.skipped == {"corrupt": 1}


def test_all_bad_raises(tmp_path):
    put(tmp_path / "only/x.jpg", b"nope")
    ds = ImageFolder(tmp_path)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        ds[0]
    assert ds.skipped == {"unidentified": 1}
    with pytest.raises(IndexError):
        ds[5]


def test_symlinks_followed_only_inside_the_root(tree, tmp_path):
    outside = tmp_path / "outside"
    put(outside / "secret.png", image_bytes((1, 2, 3)))
    put(outside / "more/other.png", image_bytes((1, 2, 3)))
    (tree / "train/cat/leak.png").symlink_to(outside / "secret.png")
    (tree / "train/dog/leakdir").symlink_to(outside / "more", target_is_directory=True)
    (tree / "train/zebra/alias.png").symlink_to(tree / "train/cat/a.png")  # inside: kept
    (tree / "train/cat/nested/loop").symlink_to(tree / "train/cat", target_is_directory=True)
    ds = ImageFolder(tree, "train")
    paths = [p for p, _ in ds.samples]
    assert not any("leak" in p or "outside" in p for p in paths)
    assert sum(p.endswith("alias.png") for p in paths) == 1
    assert len(paths) == 7  # the six files + the alias; the loop adds nothing
    assert ds.skipped == {"outside_root": 2}
