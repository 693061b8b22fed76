"""The built-in synthetic dataset: coloured shapes with templated captions (``vlkit data shapes``).

Each image holds one main object whose ``"<colour> <shape>"`` is its class, on a muted textured background, sometimes
with a second, smaller object of another shape and colour. Captions always name the main object's colour and shape and
sometimes its size, position, the background and the second object. Output is webdataset shards (``KEY.jpg``,
``KEY.txt``, ``KEY.cls``, ``KEY.json``) with ``sizes.json`` per split and ``classes.json`` (class names and zero-shot
prompt templates), or an ImageFolder tree with ``--classification``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from vlkit.data.shapes_render import (
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    PALETTE,
    SHAPES,
    TEMPLATES,
    Scene,
    caption,
    class_names,
    heldout_combos,
    metadata,
    render,
    sample_scene,
)
from vlkit.utils.argtypes import int_in_range, non_negative_int, positive_int, probability

GENERATOR = "vlkit data shapes"
FORMAT_VERSION = 1
SPLITS = {"train": 0, "val": 1}  # each split draws from its own seed stream
MIN_SIZE, MAX_SIZE = 16, 1024
DEFAULTS = {"train": 10_000, "val": 1_000, "size": 32, "seed": 0, "shard_size": 500, "second_prob": 0.2}
_MTIME = 946_684_800  # 2000-01-01: a fixed member time keeps shards byte-identical across runs


# ------------------------------------------------------------------------------------------------------------ samples


def balanced_labels(n: int, num_classes: int, seed: int, split: str) -> np.ndarray:
    """Class index of each of the ``n`` samples of a split: every class ``n // C`` or ``n // C + 1`` times, shuffled."""
    rng = np.random.default_rng([seed, SPLITS[split], 0])
    return rng.permutation(np.arange(n) % num_classes)


def make_sample(
    seed: int,
    split: str,
    index: int,
    label: int,
    *,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    second_prob: float = DEFAULTS["second_prob"],
    heldout: bool = True,
) -> tuple[Scene, str, list[str]]:
    """The scene, caption and mentioned attributes of one sample, from its own seed stream.

    Depending only on ``(seed, split, index, label)`` and the options makes every sample reproducible on its own, so
    shard size or writing order never changes the data.
    """
    rng = np.random.default_rng([seed, SPLITS[split], 1, index])
    combos = heldout_combos()
    exclude = frozenset(combos) if heldout and split == "train" else frozenset()
    scene = sample_scene(rng, label, tuple(shapes), tuple(colors), second_prob=second_prob, exclude=exclude)
    scene.heldout_combo = heldout and (scene.background, scene.main.position) in combos
    text, mentions = caption(scene, rng)
    return scene, text, mentions


def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 chroma: at 32 px, 4:2:0 subsampling would bleed a small shape's colour into its background.
        image.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def _render_range(job: tuple[str, int, list[int], dict]) -> list[tuple[str, int, dict[str, bytes]]]:
    """Files of samples ``start ..`` of a split, one per label; top-level so that worker processes can run it."""
    split, start, labels, p = job
    out = []
    for index, label in enumerate(labels, start):
        scene, text, mentions = make_sample(p["seed"], split, index, label, **p["options"])
        key = f"{split}_{index:07d}"
        meta = {"key": key, "split": split, "label": label, "class": p["classes"][label], "caption": text}
        meta |= metadata(scene, p["size"]) | {"caption_mentions": mentions}
        files = {
            "cls": str(label).encode(),
            p["fmt"]: _encode(render(scene, p["size"]), p["fmt"], p["quality"]),
            "json": json.dumps(meta, sort_keys=True).encode(),
            "txt": text.encode(),
        }
        out.append((key, label, files))
    return out


def _samples(split: str, n: int, chunk: int, mapper: Callable, params: dict) -> Iterator[tuple[str, int, dict]]:
    # Chunks come back in order whichever process rendered them, and each sample has its own seed stream: the files
    # do not depend on the number of workers.
    labels = balanced_labels(n, len(params["classes"]), params["seed"], split).tolist()
    jobs = [(split, start, labels[start : start + chunk], params) for start in range(0, n, chunk)]
    for rendered in mapper(_render_range, jobs):
        yield from rendered


# ------------------------------------------------------------------------------------------------------------ writing


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    # Fixed owner, mode and time, and a fixed member order: the same samples always give the same bytes.
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_shards(split_dir: Path, samples: Iterator, n: int, shard_size: int, bar) -> dict[str, int]:
    sizes: dict[str, int] = {}
    members: list[tuple[str, bytes]] = []
    count = 0
    for key, _, files in samples:
        members += [(f"{key}.{ext}", data) for ext, data in sorted(files.items())]
        count += 1
        bar.update(1)
        if count == shard_size or (len(sizes) * shard_size + count == n):
            name = f"{len(sizes):06d}.tar"
            _write_tar(split_dir / name, members)
            sizes[name] = count
            members, count = [], 0
    _write_json(split_dir / "sizes.json", sizes)
    return sizes


def _write_folders(split_dir: Path, samples: Iterator, folders: list[str], bar) -> dict[str, int]:
    counts = dict.fromkeys(folders, 0)
    for folder in folders:
        (split_dir / folder).mkdir()
    for key, label, files in samples:
        (split_dir / folders[label] / f"{key}.png").write_bytes(files["png"])
        counts[folders[label]] += 1
        bar.update(1)
    return counts


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a ``train/`` or ``val/`` this command did not write: it may be someone's data."""
    if not any((out / split).exists() for split in SPLITS):
        return
    try:
        ours = json.loads((out / "classes.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out} already has train/ or val/ that 'vlkit data shapes' did not write (no classes.json of ours); "
            "choose another --out or remove them"
        )


def _validate(train, val, size, seed, shard_size, shapes, colors, second_prob, quality, workers) -> None:
    for name, value in (("train", train), ("val", val), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for kind, names, known in (("shape", shapes, SHAPES), ("color", colors, tuple(PALETTE))):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"unknown {kind}(s) {unknown or names}: choose from {', '.join(known)}")
        if len(set(names)) != len(names):
            raise ValueError(f"repeated {kind} in {list(names)}")
    if not 0.0 <= second_prob <= 1.0:
        raise ValueError(f"second_prob must be in [0, 1], got {second_prob}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")


def write_shapes_dataset(
    out_dir: str | os.PathLike,
    *,
    train: int = DEFAULTS["train"],
    val: int = DEFAULTS["val"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    shard_size: int = DEFAULTS["shard_size"],
    classification: bool = False,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    second_prob: float = DEFAULTS["second_prob"],
    heldout: bool = True,
    quality: int = 95,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the synthetic shapes dataset and return a summary.

    Webdataset layout: ``out_dir/{train,val}/000000.tar ...`` with members ``KEY.jpg``, ``KEY.txt`` (caption),
    ``KEY.cls`` (class index), ``KEY.json`` (metadata), plus ``sizes.json`` per split. ImageFolder layout
    (``classification=True``): ``out_dir/{train,val}/<class_folder>/KEY.png``. Both write ``out_dir/classes.json``.
    Everything is staged in a hidden directory and moved into place at the end, ``classes.json`` last, so a present
    ``classes.json`` means a complete dataset. The same arguments give byte-identical files.

    Args:
        out_dir: output directory (created if needed). Earlier output of this function there is replaced; a
            ``train/`` or ``val/`` written by anything else is refused.
        train: number of training samples.
        val: number of held-out samples (own seed stream; also the only split with the held-out
            background x position pairs when ``heldout``).
        size: image side in pixels (16-1024).
        seed: dataset seed (>= 0).
        shard_size: samples per shard (webdataset layout).
        classification: write an ImageFolder tree of PNGs instead of shards.
        shapes: shape names; classes are every ``"<colour> <shape>"`` pair, sorted.
        colors: colour names.
        second_prob: probability that an image holds a second, smaller object.
        heldout: keep some (background, position) pairs out of the train split.
        quality: JPEG quality (webdataset layout).
        workers: rendering processes (``None``: one per CPU core, up to 8, from 4000 images on). The output does not
            depend on it. Processes are spawned, so a script calling this needs the ``if __name__ == "__main__"``
            guard when ``workers > 1``.
        progress: show a progress bar.

    Returns:
        A summary: ``out``, ``format``, ``classes``, ``num_classes``, ``size``, ``seed``, ``classes_file``,
        ``splits`` (per split: ``path``, ``samples``, ``shards`` or ``folders``, ``per_class``) and ``seconds``.

    Raises:
        ValueError: an invalid argument, or an ``out_dir`` holding data this function did not write.
    """
    from tqdm import tqdm

    shapes, colors = tuple(shapes), tuple(colors)
    _validate(train, val, size, seed, shard_size, shapes, colors, second_prob, quality, workers)
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out)
    for stale in out.glob(".shapes-staging-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    classes = class_names(shapes, colors)
    folders = [c.replace(" ", "_") for c in classes]
    fmt = "png" if classification else "jpg"
    options = {"shapes": shapes, "colors": colors, "second_prob": second_prob, "heldout": heldout}
    params = {"classes": classes, "size": size, "seed": seed, "quality": quality, "fmt": fmt, "options": options}
    if workers is None:
        # Starting processes costs about a second; below a few thousand images one process is as fast.
        workers = min(os.cpu_count() or 1, 8) if train + val >= 4000 else 1
    counts = {"train": train, "val": val}
    splits: dict[str, dict] = {}
    staging = Path(tempfile.mkdtemp(prefix=".shapes-staging-", dir=out))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    mapper = pool.imap if pool is not None else map
    try:
        with tqdm(total=train + val, unit="img", desc="shapes", disable=not progress, file=sys.stderr) as bar:
            for split, n in counts.items():
                split_dir = staging / split
                split_dir.mkdir()
                samples = _samples(split, n, shard_size if not classification else 250, mapper, params)
                per_class = np.bincount(balanced_labels(n, len(classes), seed, split), minlength=len(classes))
                info = {"path": str(out / split), "samples": n, "per_class": dict(zip(classes, per_class.tolist()))}
                if classification:
                    _write_folders(split_dir, samples, folders, bar)
                    info["folders"] = len(folders)
                else:
                    sizes = _write_shards(split_dir, samples, n, shard_size, bar)
                    info["shards"] = [str(out / split / name) for name in sizes]
                splits[split] = info
        _write_json(
            staging / "classes.json",
            {
                "generator": GENERATOR,
                "version": FORMAT_VERSION,
                "classes": classes,
                "folders": folders,
                "templates": list(TEMPLATES),
                "shapes": list(shapes),
                "colors": list(colors),
                "format": "imagefolder" if classification else "webdataset",
                "image_ext": fmt,
                "size": size,
                "seed": seed,
                "samples": counts,
                "second_prob": second_prob,
                "heldout_combos": [list(c) for c in heldout_combos()] if heldout else [],
            },
        )
        # Replace earlier output: classes.json goes first and comes back last, so it only exists when all is there.
        for name in ("classes.json", *SPLITS):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for name in (*SPLITS, "classes.json"):
            os.replace(staging / name, out / name)
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(staging, ignore_errors=True)

    return {
        "out": str(out),
        "format": "imagefolder" if classification else "webdataset",
        "classes": classes,
        "num_classes": len(classes),
        "size": size,
        "seed": seed,
        "classes_file": str(out / "classes.json"),
        "splits": splits,
        "seconds": round(time.perf_counter() - start, 3),
    }


# ------------------------------------------------------------------------------------------------------------ command


def _image_size(text: str) -> int:
    return int_in_range(text, MIN_SIZE, MAX_SIZE)


def _quality(text: str) -> int:
    return int_in_range(text, 1, 100)


def _names(known: Sequence[str]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(known)}")
        return names

    return parse


def add_scene_arguments(p: argparse.ArgumentParser) -> None:
    """The scene options that ``vlkit data shapes`` and ``vlkit data shapes-vqa`` share."""
    p.add_argument(
        "--size",
        type=_image_size,
        default=DEFAULTS["size"],
        metavar="PX",
        help=f"image side in pixels, {MIN_SIZE}-{MAX_SIZE} (default 32: the input size of clip-tiny and vit-tiny)",
    )
    p.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"], metavar="S", help="dataset seed")
    p.add_argument(
        "--shapes",
        type=_names(SHAPES),
        default=DEFAULT_SHAPES,
        metavar="LIST",
        help=f"comma-separated shapes (default {','.join(DEFAULT_SHAPES)}; available: {', '.join(SHAPES)})",
    )
    p.add_argument(
        "--colors",
        type=_names(tuple(PALETTE)),
        default=DEFAULT_COLORS,
        metavar="LIST",
        help=f"comma-separated colours (default {','.join(DEFAULT_COLORS)}; available: {', '.join(PALETTE)})",
    )
    p.add_argument(
        "--second-prob",
        type=probability,
        default=DEFAULTS["second_prob"],
        metavar="P",
        help="probability of a second, smaller object",
    )
    p.add_argument(
        "--no-heldout",
        dest="heldout",
        action="store_false",
        help="show every background x position pair in training too (by default a few appear only in val)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlkit data shapes``."""
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--train", type=positive_int, default=DEFAULTS["train"], metavar="N", help="training samples")
    p.add_argument("--val", type=positive_int, default=DEFAULTS["val"], metavar="M", help="held-out samples")
    add_scene_arguments(p)
    p.add_argument(
        "--shard-size", type=positive_int, default=DEFAULTS["shard_size"], metavar="K", help="samples per shard"
    )
    p.add_argument(
        "--classification",
        action="store_true",
        help="write an ImageFolder tree (train/<class_name>/KEY.png, spaces in class names as underscores) "
        "instead of webdataset shards",
    )
    p.add_argument("--quality", type=_quality, default=95, metavar="Q", help="JPEG quality, 1-100")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="rendering processes (default: one per core from 4000 images on); the output does not depend on it",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shapes`` to the ``vlkit data`` sub-commands."""
    p = subparsers.add_parser(
        "shapes",
        help="write the built-in synthetic image-caption dataset (coloured shapes)",
        description="Write the synthetic shapes dataset: coloured shapes on muted textured backgrounds with templated "
        f"captions, {len(DEFAULT_SHAPES) * len(DEFAULT_COLORS)} '<colour> <shape>' classes by default, as "
        "webdataset shards (KEY.jpg, KEY.txt, KEY.cls, KEY.json) with sizes.json per split, plus classes.json "
        "(class names and zero-shot prompt templates). The same seed gives byte-identical files.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def format_summary(summary: dict) -> str:
    """Human-readable lines for a ``write_shapes_dataset`` summary."""
    splits = summary["splits"]
    lines = [
        f"wrote {splits['train']['samples']} train + {splits['val']['samples']} val images "
        f"({summary['size']}x{summary['size']} px, {summary['num_classes']} classes, seed {summary['seed']}, "
        f"{summary['format']}) in {summary['seconds']:.1f} s"
    ]
    for split, info in splits.items():
        per_class = info["per_class"].values()
        if "shards" in info:
            n = len(info["shards"])
            where = f"{n} shard{'s' if n != 1 else ''} + sizes.json"
        else:
            where = f"{info['folders']} class folders"
        lines.append(f"  {split + ':':6} {info['path']}  ({where}; {min(per_class)}-{max(per_class)} per class)")
    lines.append(f"  classes: {summary['classes_file']}  ({', '.join(summary['classes'])})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit data shapes``; returns the exit code (2 for bad arguments or an output directory not ours)."""
    try:
        summary = write_shapes_dataset(
            args.out,
            train=args.train,
            val=args.val,
            size=args.size,
            seed=args.seed,
            shard_size=args.shard_size,
            classification=args.classification,
            shapes=args.shapes,
            colors=args.colors,
            second_prob=args.second_prob,
            heldout=args.heldout,
            quality=args.quality,
            workers=args.workers,
            progress=not (args.quiet or args.json),
        )
    except ValueError as e:
        print(f"vlkit data shapes: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


__all__ = ["add_arguments", "make_sample", "register", "run", "write_shapes_dataset"]
