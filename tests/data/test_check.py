"""``vlkit data check``: counts, sizes, caption tokens, truncation, unreadable samples and shards, exit codes."""

import io
import json
import os
import tarfile

from PIL import Image

from vlkit.cli import main
from vlkit.data.check import check_shards, find_shards


def jpeg(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_dataset(root):
    write_tar(
        root / "train" / "000000.tar",
        [
            ("a.jpg", jpeg(40, 30)),
            ("a.txt", b"a small green square"),
            ("b.jpg", jpeg(60, 20)),
            ("b.txt", ("word " * 100).encode()),  # 100 words: more than 77 tokens
            ("c.jpg", b"\xff\xd8\xff\xe0 broken"),
            ("c.txt", b"broken image"),
        ],
    )
    write_tar(root / "val" / "000000.tar", [("d.png", jpeg(50, 50)), ("d.txt", b"val"), ("e.jpg", jpeg(20, 80))])
    (root / "train" / "sizes.json").write_text(json.dumps({"000000.tar": 3}))


def run_check(capsys, *args):
    code = main(["data", "check", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_check_reports_counts_sizes_tokens_and_bad_samples(tmp_path, capsys):
    make_dataset(tmp_path)
    code, r = run_check(capsys, str(tmp_path), "--tokenizer", "words")
    assert code == 0 and r["ok"]
    assert r["shards"] == 2 and r["samples"] == 5 and r["good_samples"] == 3
    # Sizes of every decodable image (e has no caption but a readable image).
    assert r["image_width"] == {"min": 20, "median": 45, "max": 60, "mean": 42.5}
    assert r["image_height"]["min"] == 20 and r["image_height"]["max"] == 80
    bad = {(os.path.basename(os.path.dirname(b["shard"])), b["key"]): b["reason"] for b in r["unreadable_samples"]}
    assert bad[("train", "c")] in ("corrupt", "truncated", "unidentified")
    assert bad[("val", "e")] == "no_caption"
    tokens = r["caption_tokens"]
    assert tokens["tokenizer"] == "words" and tokens["max"] == 102
    assert sum(b["count"] for b in tokens["histogram"]) == 3
    assert r["truncated"]["count"] == 1 and abs(r["truncated"]["rate"] - 1 / 3) < 1e-9
    assert r["sizes_json_mismatch"] == []


def test_check_with_clip_tokens_and_text_report(tmp_path, capsys):
    make_dataset(tmp_path)
    code = main(["data", "check", str(tmp_path / "train")])
    out = capsys.readouterr().out
    assert code == 0
    assert "truncated (> 77 tokens): 1" in out and "c: " in out and "OK" in out
    report = check_shards(find_shards(str(tmp_path)), tokenizer="clip")
    assert report["caption_tokens"]["tokenizer"] != "words" or report["caption_tokens"]["note"]
    assert report["truncated"]["count"] == 1


def test_check_exits_1_on_unreadable_or_truncated_shard(tmp_path, capsys):
    make_dataset(tmp_path)
    (tmp_path / "train" / "000001.tar").write_bytes(os.urandom(2048))
    full = (tmp_path / "train" / "000000.tar").read_bytes()
    with tarfile.open(tmp_path / "train" / "000000.tar") as tar:
        cut = tar.getmember("b.txt").offset_data + 10  # inside b's caption
    (tmp_path / "train" / "000002.tar").write_bytes(full[:cut])
    code, r = run_check(capsys, str(tmp_path), "--tokenizer", "words")
    assert code == 1 and not r["ok"]
    reasons = {os.path.basename(b["shard"]): b["reason"] for b in r["unreadable_shards"]}
    assert reasons == {"000001.tar": "unreadable", "000002.tar": "truncated"}
    code = main(["data", "check", str(tmp_path / "train" / "{000000..000003}.tar")])
    assert code == 1 and "000003.tar: unreadable" in capsys.readouterr().out


def test_check_exits_2_when_nothing_matches(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nothing-*.tar")]) == 2
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "no .tar shards" in capsys.readouterr().err


def test_check_flags_sizes_json_that_disagrees(tmp_path, capsys):
    make_dataset(tmp_path)
    (tmp_path / "train" / "sizes.json").write_text(json.dumps({"000000.tar": 7}))
    _, r = run_check(capsys, str(tmp_path), "--tokenizer", "words")
    assert r["sizes_json_mismatch"] == [{"shard": str(tmp_path / "train" / "000000.tar"), "sizes_json": 7, "found": 3}]
