"""Bad input never stops the loader: every good sample arrives, each bad one is skipped once, counted and named."""

import io
import logging
import os
import struct
import tarfile
import zlib

import numpy as np
import torch
from PIL import Image

from vlkit.data.shards import build_shard_loader

IMAGE_KEY = "jpg;jpeg;png;webp;gif"
# Reasons the image decoder may give for a broken file (vlkit.data.images, or the loader's minimal fallback).
BROKEN = {"corrupt", "truncated", "unidentified"}


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(side=100_000):
    """A tiny file declaring a 10-gigapixel image."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )


def good_jpeg(seed):
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)), "JPEG")


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bad_members():
    """(members, keys that must arrive, {key: expected skip reasons})."""
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    png16 = Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 160)
    assert png16.mode.startswith("I;16")
    half = good_jpeg(99)
    good = {
        "g0": ("jpg", good_jpeg(0), b"a red square"),
        "cmyk": ("jpg", encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), b"cmyk photo"),
        "png16": ("png", encode(png16, "PNG"), b"sixteen bits"),
        "rgba": ("png", encode(Image.new("RGBA", (20, 20), (0, 255, 0, 128)), "PNG"), b"half transparent"),
        "anim": ("gif", gif.getvalue(), b"an animated gif"),
        "latin1": ("jpg", good_jpeg(1), "café au lait".encode("latin-1")),
        "long": ("jpg", good_jpeg(2), ("word " * 2000).encode()),
        "g1": ("jpeg", good_jpeg(3), b"another photo"),
    }
    bad = {
        "corrupt": ("jpg", b"\xff\xd8\xff\xe0" + os.urandom(500), b"garbage", BROKEN),
        "halfjpeg": ("jpg", half[: len(half) // 2], b"cut in half", BROKEN),
        "zero": ("jpg", b"", b"zero bytes", {"empty"}),
        "bomb": ("png", bomb_png(), b"decompression bomb", {"too_large"}),
        "nocap": ("jpg", good_jpeg(4), None, {"no_caption"}),
        "emptycap": ("jpg", good_jpeg(5), b"   ", {"empty_caption"}),
        "noimage": ("json", b"{}", b"caption only", {"no_image"}),
        "../escape": ("jpg", good_jpeg(6), b"path traversal", {"unsafe_key"}),
        "/abs/olute": ("jpg", good_jpeg(7), b"absolute path", {"unsafe_key"}),
    }
    members = []
    for key, (ext, img, cap, *_) in list(good.items()) + list(bad.items()):
        members.append((f"{key}.{ext}", img))
        if cap is not None:
            members.append((f"{key}.txt", cap))
    return members, set(good), {k: v[3] for k, v in bad.items()}


def transform(img):
    assert img.mode == "RGB"
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float()


def tokenizer(captions):
    return torch.tensor([[min(len(c), 10**6)] + [0] * 76 for c in captions])


def make_bad_dataset(root):
    root.mkdir()
    members, good, bad = bad_members()
    write_tar(root / "000000.tar", members)
    # A shard that breaks off inside its fourth sample's image: three samples arrive, then the shard is reported.
    ok = [(f"t{i}.jpg", good_jpeg(10 + i)) for i in range(5)]
    write_tar(root / "000001.tar", [m for i, (n, d) in enumerate(ok) for m in ((n, d), (f"t{i}.txt", b"truncated"))])
    with tarfile.open(root / "000001.tar") as tar:
        cut = tar.getmember("t3.jpg").offset_data + 100
    with open(root / "000001.tar", "r+b") as f:
        f.truncate(cut)
    (root / "000002.tar").write_bytes(os.urandom(3000))  # cannot be opened at all
    write_tar(root / "000003.tar", [("z0.jpg", good_jpeg(20)), ("z0.txt", b"after the broken ones")])
    good |= {"t0", "t1", "t2", "z0"}
    return root, good, bad


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_bad_input_yields_every_good_sample_and_counts_each_bad_one(tmp_path, caplog, monkeypatch):
    root, good, bad = make_bad_dataset(tmp_path / "shards")
    shards = f"{root}/{{000000..000004}}.tar"  # 000004.tar does not exist
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = files_under(tmp_path)
    caplog.set_level(logging.WARNING, logger="vlkit.data")
    ld = build_shard_loader(
        shards, batch_size=3, image_transform=transform, tokenizer=tokenizer, num_workers=0, image_key=IMAGE_KEY
    )
    batches = list(ld)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good)
    captions = dict(zip(keys, [c for b in batches for c in b["caption"]]))
    assert captions["latin1"] == "caf\ufffd au lait"  # decoded with replacement, not dropped
    assert len(captions["long"]) == 9999  # long captions pass; the tokenizer truncates
    assert all(b["image"].shape[1:] == (3, 8, 8) for b in batches)

    m = ld.metrics
    assert m["samples"] == len(good)
    assert m["skipped_total"] == len(bad)
    assert m["repaired"] == {"caption_not_utf8": 1}
    for reason in ("empty", "too_large", "no_caption", "empty_caption", "no_image"):
        assert m["skipped"][reason] == 1
    assert m["skipped"]["unsafe_key"] == 2
    assert sum(m["skipped"].get(r, 0) for r in BROKEN) == 2
    errors = m["shard_errors"]
    assert errors[f"{root}/000001.tar"]["reason"] == "truncated"
    assert errors[f"{root}/000002.tar"]["reason"] == "unreadable"
    assert errors[f"{root}/000004.tar"]["reason"] == "unreadable"

    # One warning per skipped sample, naming its shard and key; one per broken shard, naming it.
    skip_logs = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(skip_logs) == len(bad)
    for key, reasons in bad.items():
        (line,) = [s for s in skip_logs if repr(key) in s]
        assert f"{root}/000000.tar" in line and any(r in line for r in reasons)
    shard_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard ")]
    assert len(shard_logs) == 3 and any("000001.tar: truncated" in s for s in shard_logs)

    # Nothing was extracted or written anywhere, '../' keys included.
    assert files_under(tmp_path) == before
    assert not list(work.iterdir())


def test_bad_input_metrics_are_the_same_with_workers(tmp_path):
    root, good, bad = make_bad_dataset(tmp_path / "shards")
    counts = []
    for workers in (0, 2):
        ld = build_shard_loader(
            str(root), batch_size=2, image_transform=transform, tokenizer=tokenizer, num_workers=workers
        )
        keys = sorted(k for b in ld for k in b["key"])
        assert keys == sorted(good - {"anim"})  # gif is not among the default image keys
        m = ld.metrics
        counts.append((m["samples"], m["skipped"], sorted(m["shard_errors"])))
    assert counts[0] == counts[1]
    assert counts[0][1]["no_image"] == 2  # noimage, and the gif under the default keys


def test_loader_survives_when_every_shard_is_broken(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"not a tar file at all" * 40)
    ld = build_shard_loader(
        str(tmp_path), batch_size=2, image_transform=transform, tokenizer=tokenizer, num_workers=0, resampled=True,
        num_samples=10,
    )  # fmt: skip
    assert list(ld) == []  # resampled from broken shards only: the reader gives up instead of spinning
    assert set(ld.metrics["shard_errors"]) == {str(tmp_path / "a.tar"), str(tmp_path / "b.tar")}
