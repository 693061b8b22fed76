"""vlkit embed / vlkit search and EmbeddingIndex: resumable builds equal uninterrupted ones, exact search equals
numpy, faiss recall against exact search, one-line errors for bad inputs."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlkit.cli import main
from vlkit.serve.encoder import ClipEncoder
from vlkit.serve.index import EmbeddingIndex, build_faiss, create_index, exact_topk
from vlkit.serve.index_cli import embed, open_source


class Killed(Exception):
    """Stands for the process being killed right after a durable chunk."""


@pytest.fixture(scope="module")
def val_folder(shapes_dir, tmp_path_factory) -> Path:
    """The held-out shapes images as files with their captions beside them (NAME.txt), plus one corrupt JPEG."""
    folder = tmp_path_factory.mktemp("val-images")
    with tarfile.open(next((shapes_dir / "val").glob("*.tar"))) as tar:
        for member in tar.getmembers():
            if member.name.endswith((".jpg", ".txt")):
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    (folder / "val_0000005b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def encoder(clip_run) -> ClipEncoder:
    return ClipEncoder.load(clip_run, device="cpu", batch_size=4)


def _embed_cli(clip_run, kind: str, spec, out, *extra: str) -> int:
    return main(["embed", "--model", str(clip_run), f"--{kind}", str(spec), "--out", str(out), "--batch-size", "4",
                 "--chunk-batches", "1", "--quiet", *extra])  # fmt: skip


def _read(out: Path) -> tuple[bytes, list[dict], dict]:
    info = json.loads((out / "index.json").read_text())
    return (out / "vectors.npy").read_bytes(), (out / "meta.jsonl").read_text().splitlines(), info


@pytest.mark.parametrize("kind", ["images", "shards"])
def test_a_killed_embed_resumes_to_the_same_index(kind, clip_run, encoder, val_folder, shapes_dir, tmp_path, capsys):
    spec = val_folder if kind == "images" else shapes_dir / "val"
    assert _embed_cli(clip_run, kind, spec, tmp_path / "whole") == 0

    def kill_after_three(chunks: int) -> None:
        if chunks == 3:
            raise Killed

    with pytest.raises(Killed):
        embed(encoder, open_source(kind, str(spec)), tmp_path / "killed", batch_size=4, chunk_batches=1,
              progress=False, on_chunk=kill_after_three)  # fmt: skip
    progress = json.loads((tmp_path / "killed" / "partial" / "progress.json").read_text())
    assert progress["count"] + sum(progress["skipped"].values()) == 12  # 3 chunks of 4 items
    assert not (tmp_path / "killed" / "index.json").exists()
    # A chunk half-written when the process died is not counted by progress.json and must be dropped.
    (tmp_path / "killed" / "partial" / "chunk-000003.npy").write_bytes(b"half a chunk")
    capsys.readouterr()
    assert _embed_cli(clip_run, kind, spec, tmp_path / "killed") == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and f"this run: {32 - progress['count']} in" in captured.out  # 32 good images
    whole, resumed = _read(tmp_path / "whole"), _read(tmp_path / "killed")
    assert whole[0] == resumed[0]  # vectors, byte for byte
    assert whole[1] == resumed[1]  # metadata rows
    assert resumed[2]["count"] == 32 and resumed[2]["skipped"] == whole[2]["skipped"]
    assert resumed[2]["skipped"] == ({"truncated": 1} if kind == "images" else {})
    assert not (tmp_path / "killed" / "partial").exists()
    # The same command on a finished index does nothing and says so.
    assert _embed_cli(clip_run, kind, spec, tmp_path / "killed") == 0
    assert "already complete: 32 images" in capsys.readouterr().out


class FakeEncoder:
    """Every image to the same unit vector: the resume bookkeeping without a model."""

    model_path, model_id, dim = "/models/fake", "fake", 4

    def __init__(self, fail_at_call: int | None = None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def transform(self, image):
        return torch.zeros(3, 8, 8)

    def embed_pixels(self, pixels):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise Killed
        return torch.nn.functional.normalize(torch.ones(len(pixels), 4), dim=-1)


def _shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(size=(8, 8)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "JPEG")
    return buf.getvalue()


def test_a_run_killed_before_its_first_chunk_resumes(tmp_path):
    from vlkit.serve.index_cli import check_out_dir, job_of

    shard = _shard(tmp_path / "s.tar", [(f"{i:03d}.jpg", _jpeg()) for i in range(6)])
    source = open_source("shards", str(shard))
    with pytest.raises(Killed):
        embed(FakeEncoder(fail_at_call=1), source, tmp_path / "idx", batch_size=4, progress=False)
    assert check_out_dir(tmp_path / "idx", job_of(FakeEncoder.model_path, source), overwrite=False) == "resume"
    assert embed(FakeEncoder(), source, tmp_path / "idx", batch_size=4, progress=False)["count"] == 6


def test_skips_after_the_last_image_are_counted_once_across_a_resume(tmp_path):
    # The last sample has no image: skipped after the last embedded one. A kill right after the final chunk (before
    # the index is joined) must not count it again when the run resumes.
    shard = _shard(tmp_path / "s.tar", [("000.jpg", _jpeg()), ("000.txt", b"red"), ("001.txt", b"no image"),
                                        ("002.jpg", _jpeg((1, 400)))])  # fmt: skip
    source = open_source("shards", str(shard))

    def kill(chunks: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        embed(FakeEncoder(), source, tmp_path / "idx", progress=False, on_chunk=kill)
    info = embed(FakeEncoder(), source, tmp_path / "idx", progress=False)
    # 001 has no image; 002 is a 1 x 400 strip (one side over 20 times the other): refused, not resized.
    assert info["count"] == 1 and info["skipped"] == {"no_image": 1, "too_large": 1}


def test_folder_rows_carry_path_caption_and_image_bytes(clip_run, val_folder, tmp_path):
    assert _embed_cli(clip_run, "images", val_folder, tmp_path / "idx") == 0
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert len(index) == 32 and index.model_id == "clip-tiny-shapes" and index.info["modality"] == "image"
    meta = index.meta(0)
    assert meta["path"] == str(val_folder / "val_0000000.jpg") and meta["key"] is None
    assert meta["caption"] == (val_folder / "val_0000000.txt").read_text().strip()
    assert index.image_bytes(0) == ((val_folder / "val_0000000.jpg").read_bytes(), "image/jpeg")
    with pytest.raises(KeyError):
        index.meta(32)


def test_caption_to_image_retrieval_equals_numpy(encoder, shapes_dir, tmp_path, capsys):
    info = embed(encoder, open_source("shards", str(shapes_dir / "val")), tmp_path / "idx", progress=False)
    index = EmbeddingIndex.open(tmp_path / "idx")
    captions = [index.meta(r)["caption"] for r in range(len(index))]
    queries = encoder.embed_texts(captions)
    hits = index.search(queries, 5)
    # The same ranking from numpy over the stored float16 vectors.
    scores = queries.numpy() @ np.load(tmp_path / "idx" / "vectors.npy").astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert [[h.row for h in row] for row in hits] == order.tolist()
    got_scores = [[h.score for h in row] for row in hits]
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, order, 1), atol=1e-5)
    recall1 = np.mean([row[0].row == i for i, row in enumerate(hits)])
    recall5 = np.mean([i in [h.row for h in row] for i, row in enumerate(hits)])
    assert recall1 == np.mean(order[:, 0] == np.arange(len(index)))
    with capsys.disabled():
        print(f"\n  caption->image over {len(index)} val images (3-step model): recall@1 {recall1:.3f} recall@5 "
              f"{recall5:.3f} (chance {1 / len(index):.3f} / {5 / len(index):.3f}); "
              f"{info['run']['items_per_second']} images/s")  # fmt: skip
    # The shard member behind a row is the image that was embedded.
    data, mime = index.image_bytes(3)
    assert mime == "image/jpeg" and data[:3] == b"\xff\xd8\xff"


def test_search_command_prints_the_top_k(clip_run, encoder, shapes_dir, tmp_path, capsys):
    pytest.importorskip("faiss")
    assert _embed_cli(clip_run, "shards", shapes_dir / "val", tmp_path / "idx", "--faiss") == 0
    assert "recall@10 against exact search 1.0000" in capsys.readouterr().out  # 32 rows: HNSW is exact
    assert main(["search", str(tmp_path / "idx"), "a red circle", "-k", "3", "--json"]) == 0  # through faiss
    rows = json.loads(capsys.readouterr().out)
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert index.info["faiss"]["type"] == "HNSW32,IP" and (tmp_path / "idx" / "faiss.index").is_file()
    expected = index.search(encoder.embed_texts(["a red circle"]), 3, exact=True)[0]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["row"] for r in rows] == [h.row for h in expected]
    assert all(r["key"].startswith("val_") and r["caption"] for r in rows)
    assert main(["search", str(tmp_path / "idx"), "a red circle", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and rows[0]["key"] in lines[0]


def test_exact_search_in_blocks_equals_one_matrix_product(monkeypatch):
    import vlkit.serve.index as index_module

    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(1000, 16, generator=gen), dim=-1).half().numpy()
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    monkeypatch.setattr(index_module, "SEARCH_BLOCK_ROWS", 64)  # 16 blocks, the last one partial
    scores, rows = exact_topk(vectors, queries, 10)
    full = queries @ torch.from_numpy(vectors.astype(np.float32)).T
    torch.testing.assert_close(scores, full.topk(10, dim=1).values)
    assert rows.tolist() == full.topk(10, dim=1).indices.tolist()


def test_faiss_recall_against_exact_search(tmp_path, capsys):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(4000, 32, generator=gen), dim=-1)
    create_index(tmp_path / "idx", vectors, [{"key": str(i)} for i in range(4000)], model_id="random")
    index = EmbeddingIndex.open(tmp_path / "idx")
    entry = build_faiss(index)
    with capsys.disabled():
        print(f"\n  faiss {entry['type']} on 4000 random 32-d vectors: recall@10 {entry['recall_at_10']:.4f} "
              f"({entry['queries']} queries)")  # fmt: skip
    assert entry["recall_at_10"] >= 0.9
    reopened = EmbeddingIndex.open(tmp_path / "idx")
    assert reopened.info["faiss"]["recall_at_10"] == entry["recall_at_10"]
    hits = reopened.search(vectors[:50], 1)  # through faiss: each row finds itself
    assert np.mean([row[0].row == i for i, row in enumerate(hits)]) >= 0.95
    assert reopened.search(vectors[:5], 3, exact=True)[0][0] == reopened.search(vectors[:5], 3)[0][0]


def test_missing_faiss_is_one_line_naming_the_extra(clip_run, val_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    assert _embed_cli(clip_run, "images", val_folder, tmp_path / "idx", "--faiss") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'vlkit[faiss]'" in err


def test_bad_inputs_are_one_line_errors(clip_run, classifier_run, val_folder, shapes_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--out", str(tmp_path / "o")]
    cases = {
        "no such directory": ["embed", "--model", str(clip_run), "--images", str(tmp_path / "nope"), *out],
        "no image files": ["embed", "--model", str(clip_run), "--images", str(empty), *out],
        "not a CLIP model": ["embed", "--model", str(classifier_run), "--images", str(val_folder), *out],
        "not an embedding index": ["search", str(empty), "a red circle"],
        "no such shard": ["embed", "--model", str(clip_run), "--shards", str(tmp_path / "x-{0..1}.tar"), *out],
        "give a text query or --image": ["search", str(empty)],
    }
    for expected, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    # An index made from other inputs is not overwritten by accident.
    assert _embed_cli(clip_run, "shards", shapes_dir / "val", tmp_path / "idx") == 0
    assert _embed_cli(clip_run, "images", val_folder, tmp_path / "idx") == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert _embed_cli(clip_run, "images", val_folder, tmp_path / "idx", "--overwrite") == 0
    assert EmbeddingIndex.open(tmp_path / "idx").info["source"]["kind"] == "images"
