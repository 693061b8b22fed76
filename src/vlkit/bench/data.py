"""``vlkit bench data``: decode + augment + tokenize throughput of JPEG shards, vlkit's loader beside open_clip's.

Both pipelines read the same freshly generated webdataset shards (256-px JPEGs with captions) into 224-px training
batches with the same number of DataLoader workers, one after the other in one process, alternating when repeated.
The peer is ``open_clip_train.data.get_wds_dataset`` itself when it can be imported (its module imports pandas only
for its CSV dataset; without pandas it is imported with a stub in its place), else an equivalent built from
webdataset the way open_clip builds it. Steady-state throughput excludes worker start-up and the first batch.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import io
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_WORDS = str.split(
    "a photo of the small large red blue green yellow dog cat bird car tree house street beach mountain river city "
    "person people child woman man sitting standing running on in at with near under over old new bright dark view "
    "close up picture painting illustration sunset morning night snow rain field road window table kitchen garden"
)


# --------------------------------------------------------------------------------------------------------------------
# Data


def make_jpeg_shards(
    out_dir: str | os.PathLike, samples: int, *, size: int = 256, shard_size: int = 250, seed: int = 0
) -> str:
    """Write ``samples`` photo-like JPEGs (``size`` px) with captions as shards + sizes.json; returns their pattern."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    from vlkit.data.write import ShardWriter

    rng = random.Random(seed)
    with ShardWriter(out_dir, shard_size) as writer:
        for i in range(samples):
            # A gradient, shapes and a little blur: JPEG sizes and decode cost closer to photos than noise or flat fill.
            c0, c1 = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
            ramp = (np.add.outer(np.arange(size), np.arange(size)) / (2 * size - 2))[..., None]
            img = Image.fromarray((c0 + (c1 - c0) * ramp).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(rng.randint(3, 8)):
                x0, y0 = rng.randrange(size), rng.randrange(size)
                box = (x0, y0, x0 + rng.randint(10, size // 2), y0 + rng.randint(10, size // 2))
                fill = tuple(rng.randrange(256) for _ in range(3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            img = img.filter(ImageFilter.GaussianBlur(1.0))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 30)))
            writer.write(f"{i:09d}", {"jpg": buf.getvalue(), "txt": caption.encode()})
    last = math.ceil(samples / shard_size) - 1
    return os.path.join(os.fspath(out_dir), f"{{{0:06d}..{last:06d}}}.tar")


# --------------------------------------------------------------------------------------------------------------------
# Components


def vlkit_components(image_size: int) -> tuple[Callable, Callable, list[str]]:
    """(train transform, tokenizer, notes): vlkit's own (notes is empty; kept for the caller's report shape)."""
    from vlkit.data.tokenizer import get_tokenizer
    from vlkit.data.transforms import get_transform

    transform = get_transform(types.SimpleNamespace(img_h=image_size, img_w=image_size), train=True)
    return transform, get_tokenizer("clip"), []


def import_open_clip_data() -> tuple[Any, list[str]]:
    """``open_clip_train.data`` (or None) and notes on how it was imported."""
    notes = []
    try:
        import open_clip_train.data as module
    except ModuleNotFoundError as e:
        if e.name != "pandas":
            return None, [f"open_clip_train.data not importable ({e}); timed an equivalent webdataset pipeline"]
        # pandas backs only open_clip's CsvDataset; get_wds_dataset never touches it.
        sys.modules["pandas"] = types.ModuleType("pandas")
        try:
            import open_clip_train.data as module
        except ImportError as e:
            return None, [f"open_clip_train.data not importable ({e}); timed an equivalent webdataset pipeline"]
        finally:
            del sys.modules["pandas"]
        notes.append("pandas is not installed: open_clip_train.data was imported with a stub pandas (CSV-only use)")
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        # webdataset >= 0.2.96 ends each shard with an {} marker that open_clip's group_by_keys_nothrow cannot read
        # (KeyError 'fname'; open_clip#935, webdataset#384); the fix named there is eof_value=None.
        module.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
        notes.append(
            "open_clip_train 3.3.0 + webdataset 1.0.2: patched tar_file_expander(eof_value=None) (open_clip#935)"
        )
    return module, notes


def open_clip_loader(
    pattern: str, samples: int, batch_size: int, workers: int, image_size: int, *, equivalent: bool = False
) -> tuple[Iterable, str, list[str]]:
    """open_clip's training loader over ``pattern``: (loader, description, notes)."""
    import open_clip

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    module, notes = (None, ["equivalent pipeline requested"]) if equivalent else import_open_clip_data()
    if module is not None:
        args = argparse.Namespace(
            train_data=pattern,
            val_data=None,
            dataset_resampled=False,
            train_num_samples=samples,
            train_data_upsampling_factors=None,
            seed=0,
            batch_size=batch_size,
            workers=workers,
            world_size=1,
        )
        info = module.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
        return info.dataloader, "open_clip_train.data.get_wds_dataset", notes
    return _equivalent(pattern, preprocess, tokenizer, batch_size, workers), "webdataset, as open_clip builds it", notes


def _equivalent(pattern: str, preprocess: Callable, tokenizer: Callable, batch_size: int, workers: int):
    import webdataset as wds

    def has_pair(sample: dict) -> bool:
        return "txt" in sample and any(k in sample for k in ("jpg", "jpeg", "png", "webp"))

    dataset = wds.DataPipeline(
        wds.SimpleShardList(pattern),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.select(has_pair),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)


# --------------------------------------------------------------------------------------------------------------------
# Timing


def _cpu_seconds() -> float:
    # Worker processes count once they have been joined (RUSAGE_CHILDREN), hence the shutdown in measure().
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_loader(batches: Iterable, count: Callable[[Any], int]) -> dict:
    """Iterate once; samples, seconds end to end, and samples/s after the first batch (workers started)."""
    start = time.perf_counter()
    first_at, first_n, n = None, 0, 0
    for batch in batches:
        n += count(batch)
        if first_at is None:
            first_at, first_n = time.perf_counter(), n
    end = time.perf_counter()
    steady = (n - first_n) / (end - first_at) if first_at is not None and end > first_at and n > first_n else 0.0
    return {
        "samples": n,
        "seconds": round(end - start, 3),
        "samples_per_s": round(steady, 1),
        "samples_per_s_end_to_end": round(n / (end - start), 1) if end > start else 0.0,
    }


def measure(make_loader: Callable[[], Iterable], count: Callable[[Any], int]) -> dict:
    """:func:`time_loader` plus the CPU time of this process and its workers per sample (robust to a busy machine)."""
    cpu = _cpu_seconds()
    loader = make_loader()
    result = time_loader(loader, count)
    del loader
    gc.collect()  # shuts persistent workers down so that their CPU time is accounted
    used = _cpu_seconds() - cpu
    result["cpu_ms_per_sample"] = round(1e3 * used / result["samples"], 3) if result["samples"] else 0.0
    return result


def run_bench(
    *,
    samples: int = 2000,
    batch_size: int = 64,
    workers: int = 2,
    image_size: int = 224,
    source_size: int = 256,
    repeat: int = 3,
    shard_size: int | None = None,
    data_dir: str | None = None,
    equivalent: bool = False,
) -> dict:
    """Generate the shards (unless ``data_dir`` holds them) and time both pipelines; returns the report."""
    import torch

    from vlkit.data.shards import build_shard_loader

    with tempfile.TemporaryDirectory(prefix="vlkit-bench-data-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        if data_dir and (root / "sizes.json").exists():
            names = sorted(p.name for p in root.glob("*.tar"))
            pattern = str(root / f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar")
            samples = sum(json.loads((root / "sizes.json").read_text()).values())
        else:
            # open_clip asserts at least one shard per worker; four per worker keeps both pipelines' workers busy.
            shard_size = shard_size or max(1, min(250, samples // max(1, 4 * workers)))
            pattern = make_jpeg_shards(root, samples, size=source_size, shard_size=shard_size)
        transform, tokenizer, notes = vlkit_components(image_size)
        results: dict[str, list[dict]] = {"vlkit": [], "open_clip": []}
        peer: dict[str, Any] = {}
        load_before = os.getloadavg()[0]

        def ours() -> Iterable:
            return build_shard_loader(
                pattern, batch_size=batch_size, image_transform=transform, tokenizer=tokenizer, num_workers=workers
            )

        def theirs() -> Iterable:
            loader, peer["name"], peer["notes"] = open_clip_loader(
                pattern, samples, batch_size, workers, image_size, equivalent=equivalent
            )
            return loader

        for _ in range(max(1, repeat)):
            results["vlkit"].append(measure(ours, lambda b: len(b["key"])))
            results["open_clip"].append(measure(theirs, lambda b: len(b[0])))
        notes += [n for n in peer["notes"] if n not in notes]

    best = {k: max(v, key=lambda r: r["samples_per_s"]) for k, v in results.items()}
    cpu = {k: min(r["cpu_ms_per_sample"] for r in v) for k, v in results.items()}
    # Runs i of both pipelines are neighbours in time, so they saw about the same load from other processes: the
    # median of their ratios is steadier on a shared machine than the ratio of the best runs.
    pairs = list(zip(results["vlkit"], results["open_clip"]))
    paired = [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs if b["samples_per_s"] and a["samples_per_s"]]
    paired_cpu = [b["cpu_ms_per_sample"] / a["cpu_ms_per_sample"] for a, b in pairs if a["cpu_ms_per_sample"]]
    return {
        "benchmark": "data",
        "samples": samples,
        "source_px": source_size,
        "image_px": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "repeat": max(1, repeat),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "vlkit": {
            **best["vlkit"],
            "best_cpu_ms_per_sample": cpu["vlkit"],
            "pipeline": "vlkit.data.stream.ShardLoader",
            "runs": results["vlkit"],
        },
        "open_clip": {
            **best["open_clip"],
            "best_cpu_ms_per_sample": cpu["open_clip"],
            "pipeline": peer["name"],
            "runs": results["open_clip"],
        },
        # Wall-clock throughput (what a GPU waits on) and CPU cost per sample (what a busy machine distorts least).
        "ratio": round(statistics.median(paired), 3) if paired else 0.0,
        "best_ratio": round(best["vlkit"]["samples_per_s"] / best["open_clip"]["samples_per_s"], 3)
        if best["open_clip"]["samples_per_s"]
        else 0.0,
        "cpu_ratio": round(statistics.median(paired_cpu), 3) if paired_cpu else 0.0,
        "notes": notes,
    }


def format_report(report: dict) -> str:
    """The side-by-side table."""
    lines = [
        f"vlkit bench data: {report['samples']} JPEGs {report['source_px']}px -> {report['image_px']}px train batches "
        f"of {report['batch_size']}, {report['workers']} workers, {report['cpu_cores']} CPU cores, "
        f"best of {report['repeat']} (load average {report['load_average'][0]} -> {report['load_average'][1]})",
        f"{'pipeline':<50} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'end-to-end':>11} {'CPU ms/sample':>14}",
    ]
    for name in ("vlkit", "open_clip"):
        r = report[name]
        label = f"{name} ({r['pipeline']})"
        lines.append(
            f"{label:<50} {r['samples']:>8} {r['seconds']:>8.2f} {r['samples_per_s']:>10.1f} "
            f"{r['samples_per_s_end_to_end']:>11.1f} {r['best_cpu_ms_per_sample']:>14.2f}"
        )
    lines.append(
        f"ratio vlkit / open_clip, samples/s after the first batch: {report['ratio']:.2f}x "
        f"(median of the {report['repeat']} paired runs; best vs best {report['best_ratio']:.2f}x)"
    )
    lines.append(
        f"ratio vlkit / open_clip, samples per CPU-second (workers + main): {report['cpu_ratio']:.2f}x "
        "(median of paired runs)"
    )
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=2000, help="JPEGs to generate (default 2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both pipelines (default 2)")
    p.add_argument("--image-size", type=int, default=224, help="output side in px (default 224)")
    p.add_argument("--source-size", type=int, default=256, help="generated JPEG side in px (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each pipeline, alternating; best reported")
    p.add_argument("--data-dir", help="reuse (or keep) shards here instead of a temporary directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` to the ``vlkit bench`` sub-commands."""
    p = subparsers.add_parser(
        "data",
        help="data loading throughput (decode + augment + tokenize), vlkit beside open_clip",
        description=__doc__.replace("``", ""),  # docstring markup is noise in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.batch_size < 1 or args.workers < 0:
        print("vlkit bench data: error: --samples and --batch-size must be >= 1, --workers >= 0", file=sys.stderr)
        return 2
    report = run_bench(
        samples=args.samples,
        batch_size=args.batch_size,
        workers=args.workers,
        image_size=args.image_size,
        source_size=args.source_size,
        repeat=args.repeat,
        data_dir=args.data_dir,
    )
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
