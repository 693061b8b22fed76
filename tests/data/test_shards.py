"""Webdataset shard loading: sources, splitting, epochs, resampling, labels and exact resume."""

import io
import json
import os
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.data import sources
from vlkit.data.shards import ShardDataset, build_shard_loader, iter_tar, split_name
from vlkit.data.stream import ShardLoader


def jpeg(i: int, size: int = 16) -> bytes:
    img = Image.new("RGB", (size, size), (i * 7 % 256, i * 13 % 256, i * 29 % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root, n_shards, per_shard, *, sizes=True, label=False, start=0, prefix=""):
    os.makedirs(root, exist_ok=True)
    table, k = {}, start
    for s in range(n_shards):
        members = []
        for _ in range(per_shard):
            members += [(f"{prefix}{k:06d}.jpg", jpeg(k)), (f"{prefix}{k:06d}.txt", f"caption {k}".encode())]
            members.append((f"{prefix}{k:06d}.json", b"{not json at all"))  # never decoded
            if label:
                members.append((f"{prefix}{k:06d}.cls", str(k % 3).encode()))
            k += 1
        write_tar(os.path.join(root, f"{s:06d}.tar"), members)
        table[f"{s:06d}.tar"] = per_shard
    if sizes:
        with open(os.path.join(root, "sizes.json"), "w") as f:
            json.dump(table, f)
    return str(root)


def transform(img):
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float()


def random_transform(img):
    # A stand-in for a random crop: the resume test needs augmentation that depends on the RNG.
    return transform(img) + torch.rand(1)


def tokenizer(captions):
    out = torch.zeros(len(captions), 77, dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, 0] = int(c.split()[-1])
    return out


def loader(path, *, workers=0, **kw):
    kw.setdefault("batch_size", 4)
    return build_shard_loader(path, image_transform=transform, tokenizer=tokenizer, num_workers=workers, **kw)


def all_keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batch_format_and_every_sample_once(tmp_path):
    path = make_shards(tmp_path / "d", 3, 5)
    ld = loader(path)
    batches = list(ld)
    b = batches[0]
    assert set(b) == {"image", "text", "caption", "key"}
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, 77) and b["text"].dtype == torch.long
    assert [int(t) for t in b["text"][:, 0]] == [int(c.split()[-1]) for c in b["caption"]]
    assert [f"caption {int(k)}" for k in b["key"]] == b["caption"]
    keys = all_keys(batches)
    assert sorted(keys) == [f"{i:06d}" for i in range(15)]
    assert ld.metrics["samples"] == 15 and ld.metrics["skipped_total"] == 0
    assert ld.num_batches == 4 and ld.epoch == 1


def test_sources_brace_glob_dir_and_lists(tmp_path):
    make_shards(tmp_path / "a", 3, 2)
    make_shards(tmp_path / "b", 2, 2, start=100)
    a = str(tmp_path / "a")
    assert sources.expand_urls(f"{a}/{{000000..000002}}.tar") == [f"{a}/00000{i}.tar" for i in range(3)]
    assert sources.expand_urls(f"{a}/*.tar") == sources.expand_urls(a)
    assert len(sources.expand_urls(a)) == 3
    assert sources.expand_urls("pipe:cat x_{0..1}.tar") == ["pipe:cat x_0.tar", "pipe:cat x_1.tar"]
    assert sources.expand_urls("s3://bucket/{00..02}.tar")[2] == "s3://bucket/02.tar"
    both = sources.parse_sources(f"{a}::{tmp_path / 'b'}")
    assert [len(s.urls) for s in both] == [3, 2]
    weighted = sources.parse_sources([(a, 3), {"url": str(tmp_path / "b"), "weight": 1}])
    assert [s.weight for s in weighted] == [3.0, 1.0]
    with pytest.raises(ValueError, match="no shards"):
        sources.expand_urls(str(tmp_path / "a" / "*.tgz"))
    with pytest.raises(ValueError, match="weights"):
        sources.parse_sources(a, weights=[1, 2])


def test_dataset_size_from_sizes_json_stats_or_config(tmp_path):
    path = make_shards(tmp_path / "d", 2, 3)
    ds = ShardDataset(path, batch_size=2, image_transform=transform, tokenizer=tokenizer)
    assert ds.num_samples == 6
    os.remove(os.path.join(path, "sizes.json"))
    assert ShardDataset(path, batch_size=2, image_transform=transform, tokenizer=tokenizer).num_samples is None
    for s in range(2):  # img2dataset's per-shard stats
        with open(os.path.join(path, f"{s:06d}_stats.json"), "w") as f:
            json.dump({"successes": 3, "failed_to_download": 9}, f)
    assert ShardDataset(path, batch_size=2, image_transform=transform, tokenizer=tokenizer).num_samples == 6
    ds = ShardDataset(path, batch_size=2, image_transform=transform, tokenizer=tokenizer, num_samples=100)
    assert ds.num_samples == 100


def test_epochs_are_deterministic_permutations(tmp_path):
    path = make_shards(tmp_path / "d", 6, 4)
    a, b = loader(path, seed=3, shuffle_buffer=10), loader(path, seed=3, shuffle_buffer=10)
    e0a, e1a = all_keys(a), all_keys(a)
    e0b = all_keys(b)
    assert e0a == e0b  # same seed, same stream
    assert e0a != e1a and sorted(e0a) == sorted(e1a)  # a new order each epoch, the same samples
    assert a.dataset.epoch_order(0) == b.dataset.epoch_order(0) != a.dataset.epoch_order(1)
    b.set_epoch(1)
    assert all_keys(b) == e1a
    unshuffled = all_keys(loader(path, shuffle=False))
    assert unshuffled == sorted(unshuffled)


def test_split_by_rank_covers_every_sample_once(tmp_path):
    path = make_shards(tmp_path / "d", 4, 3)
    keys = [all_keys(loader(path, rank=r, world_size=2, equal_batches=False)) for r in range(2)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:06d}" for i in range(12)]


def test_fewer_shards_than_readers_warns_and_stays_exact(tmp_path):
    path = make_shards(tmp_path / "d", 1, 9, sizes=False)
    keys = []
    for rank in range(2):
        with pytest.warns(UserWarning, match="only 1 shard"):
            ld = loader(path, workers=2, rank=rank, world_size=2, batch_size=2, equal_batches=False)
        keys += all_keys(ld)
    assert sorted(keys) == [f"{i:06d}" for i in range(9)]  # 4 readers share one shard, each sample once


def test_equal_batches_per_rank_with_uneven_shards(tmp_path):
    path = make_shards(tmp_path / "d", 3, 4)  # 12 samples: rank 0 gets 2 shards, rank 1 one
    counts = [len(list(loader(path, rank=r, world_size=2, batch_size=2))) for r in range(2)]
    assert counts == [3, 3]  # ceil(12 / (2 * 2)) batches each; rank 1 goes round its shard again


def test_resampled_weights_share_samples(tmp_path):
    a = make_shards(tmp_path / "a", 4, 5)
    b = make_shards(tmp_path / "b", 1, 5, start=1000)
    ld = build_shard_loader(
        [(a, 3.0), (b, 1.0)],
        batch_size=10,
        image_transform=transform,
        tokenizer=tokenizer,
        num_workers=0,
        resampled=True,
        num_samples=800,
        shuffle_buffer=50,
    )
    keys = all_keys(ld)
    assert len(keys) == 800  # a resampled epoch is num_samples long
    share_b = sum(int(k) >= 1000 for k in keys) / len(keys)
    assert 0.15 < share_b < 0.35  # 1 of 4 by weight, although b has 1 shard of 5
    with pytest.raises(ValueError, match="resampled"):
        build_shard_loader([(a, 3.0), (b, 1.0)], batch_size=2, image_transform=transform, tokenizer=tokenizer)


def test_label_key(tmp_path):
    path = make_shards(tmp_path / "d", 1, 6, label=True)
    b = next(iter(loader(path, label_key="cls", shuffle=False)))
    assert b["label"].tolist() == [int(k) % 3 for k in b["key"]]


def test_pipe_file_and_fsspec_urls(tmp_path):
    path = make_shards(tmp_path / "d", 2, 3)
    local = all_keys(loader(f"{path}/{{000000..000001}}.tar", shuffle=False))
    piped = all_keys(loader(f"pipe:cat {path}/{{000000..000001}}.tar", shuffle=False))
    file_url = all_keys(loader(f"file://{path}/{{000000..000001}}.tar", shuffle=False))
    assert local == piped == file_url and len(local) == 6
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for s in range(2):
        with open(f"{path}/{s:06d}.tar", "rb") as src, fs.open(f"/vlkit-test/{s:06d}.tar", "wb") as dst:
            dst.write(src.read())
    assert all_keys(loader("memory://vlkit-test/{000000..000001}.tar", shuffle=False)) == local


def test_iter_tar_groups_by_key_and_skips(tmp_path):
    write_tar(
        tmp_path / "x.tar",
        [("a/1.jpg", b"1"), ("a/1.seg.png", b"2"), ("a/2.jpg", b"3"), ("__meta__", b""), ("noext", b"")],
    )
    recs = list(iter_tar(str(tmp_path / "x.tar")))
    assert [(r.index, r.key, sorted(r.fields)) for r in recs] == [(0, "a/1", ["jpg", "seg.png"]), (1, "a/2", ["jpg"])]
    assert [r.key for r in iter_tar(str(tmp_path / "x.tar"), skip=1)] == ["a/2"]
    assert split_name("dir/0001.seg.jpg") == ("dir/0001", "seg.jpg")


def _cut(path, workers, cut, epochs=1, **kw):
    """Batches of an uninterrupted run, and of a run interrupted after ``cut`` batches and resumed from JSON."""

    def make():
        return build_shard_loader(
            path, image_transform=random_transform, tokenizer=tokenizer, num_workers=workers, **kw
        )

    full = list(make_iter(make(), epochs))
    first = make()
    it = make_iter(first, epochs)
    seen = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(make_iter(resumed, epochs - state["epoch"]))
    return full, seen + rest, state


def make_iter(ld, epochs):
    for _ in range(epochs):
        yield from ld


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_stream(tmp_path, workers):
    path = make_shards(tmp_path / "d", 5, 7)  # 35 samples, uneven: 3 + 2 shards for 2 workers
    kw = dict(batch_size=4, shuffle_buffer=6, seed=5)
    cuts = [1, 3, 6] if workers == 0 else [5, 9]  # 9: worker 1 has finished, worker 0 has not
    for cut in cuts:
        expected, got, state = _cut(path, workers, cut, epochs=2, **kw)
        assert [b["key"] for b in got] == [b["key"] for b in expected]
        for x, y in zip(got, expected):
            assert torch.equal(x["image"], y["image"])  # augmentation too: seeded per sample
            assert torch.equal(x["text"], y["text"])
        assert state["epoch"] == 0 and state["num_workers"] == max(1, workers)
    # Resuming in the second epoch, after the first was complete.
    first_epoch = len(
        list(build_shard_loader(path, image_transform=transform, tokenizer=tokenizer, num_workers=workers, **kw))
    )
    expected, got, state = _cut(path, workers, first_epoch + 2, epochs=2, **kw)
    assert state["epoch"] == 1
    assert [b["key"] for b in got] == [b["key"] for b in expected]


def test_resume_state_describes_position_and_rejects_mismatch(tmp_path):
    path = make_shards(tmp_path / "d", 4, 5)
    ld = loader(path, workers=0, shuffle_buffer=3)
    it = iter(ld)
    next(it), next(it)
    state = ld.state_dict()
    w = state["workers"]["0"]
    assert set(w) >= {"part", "offset", "block", "emitted", "batches", "done", "shard"}
    assert w["batches"] == 2 and w["shard"].endswith(".tar") and not w["done"]
    json.dumps(state)
    other = loader(path, workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(path, seed=1).load_state_dict(state)


def test_resume_in_resampled_mode(tmp_path):
    path = make_shards(tmp_path / "d", 3, 5)
    kw = dict(batch_size=3, resampled=True, num_samples=30, shuffle_buffer=4)
    expected, got, _ = _cut(path, 0, 4, epochs=1, **kw)
    assert len(expected) == 10
    assert [b["key"] for b in got] == [b["key"] for b in expected]


def test_metrics_and_warnings_are_aggregated_across_workers(tmp_path):
    path = make_shards(tmp_path / "d", 2, 4)
    # One bad image in each shard: each worker skips one, the main process must count both.
    for s in range(2):
        with tarfile.open(os.path.join(path, f"{s:06d}.tar"), "a") as tar:
            for name, data in ((f"bad{s}.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), (f"bad{s}.txt", b"x")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ld = loader(path, workers=2, batch_size=3)
    keys = all_keys(ld)
    assert len(keys) == 8
    m = ld.metrics
    assert m["skipped_total"] == 2 and m["samples"] == 8
    assert sum(Counter(m["skipped"]).values()) == 2


def test_integration_with_real_tokenizer_transforms_and_shapes(tmp_path):
    """The real tokenizer, transforms, decoder and synthetic shapes writer."""
    from vlkit.data import tokenizer as tok_mod
    from vlkit.data import transforms as tr_mod
    from vlkit.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", train=8, val=4, size=32, shard_size=4, workers=1, progress=False)
    path = str(tmp_path / "shapes" / "train")
    tf = tr_mod.get_transform(SimpleNamespace(img_h=24, img_w=24), train=True)
    ds = ShardDataset(path, batch_size=4, image_transform=tf, tokenizer=tok_mod.get_tokenizer("clip"), label_key="cls")
    ld = ShardLoader(ds, num_workers=0)
    assert ds.num_samples == 8  # from the writer's sizes.json
    batches = list(ld)
    assert [tuple(b["image"].shape) for b in batches] == [(4, 3, 24, 24)] * 2
    assert all(b["text"].shape == (4, 77) and b["text"].dtype == torch.long for b in batches)
    assert all(b["label"].dtype == torch.long and len(b["caption"]) == 4 for b in batches)
    assert ld.metrics["skipped_total"] == 0
