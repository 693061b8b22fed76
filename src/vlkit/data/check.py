"""``vlkit data check DIR_OR_PATTERN``: read every sample of a set of shards and report what a training run would see.

Counts, image sizes, caption lengths in tokens (with the truncation rate at the 77-token context), and every sample
or shard that cannot be read, by shard and key. Exit code 1 when any shard cannot be opened or is truncated, 2 when
nothing matches, 0 otherwise (unreadable *samples* alone are listed but do not fail the check: the loader skips them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlkit.data.shards import DEFAULT_IMAGE_KEY, iter_tar
from vlkit.data.sources import expand_urls, is_remote, shard_sizes
from vlkit.data.stream import DEFAULT_TEXT_KEY, TOO_LARGE, ShardError, default_decode, is_unsafe_key

CONTEXT_LENGTH = 77
BINS = ((1, 8), (9, 16), (17, 32), (33, 48), (49, 64), (65, 77), (78, 128), (129, 256), (257, None))


def find_shards(target: str) -> list[str]:
    """A directory (searched recursively for ``*.tar``), or any spec :func:`vlkit.data.sources.expand_urls` takes."""
    path = Path(target).expanduser()
    if not is_remote(target) and path.is_dir():
        return sorted(str(p) for p in path.rglob("*.tar"))
    try:
        urls = expand_urls(target)
    except ValueError:
        return []
    # A typo is "nothing found" (usage error); a missing member of an existing range is an unreadable shard.
    if not any(is_remote(u) or Path(u).exists() for u in urls):
        return []
    return urls


def token_counter(name: str | None) -> tuple[Callable[[list[str]], list[int]], str, str]:
    """(captions -> token counts including start/end tokens, tokenizer description, note).

    Uses vlkit's tokenizer ``name``; ``words`` (or no name) counts whitespace-separated words (+2).
    """
    if name and name != "words":
        from vlkit.data.tokenizer import get_tokenizer

        counter, note = _vlkit_counter(get_tokenizer(name))
        return counter, f"vlkit:{name}", note
    return lambda caps: [len(c.split()) + 2 for c in caps], "words", ""


def _vlkit_counter(tok: Any) -> tuple[Callable[[list[str]], list[int]], str]:
    encode = getattr(tok, "encode", None)
    if callable(encode):
        # Whether encode() includes the start/end tokens is learned from a short text the padded call counts exactly.
        probe = "a photo of a cat"
        padded = int((tok([probe])[0] != 0).sum())
        extra = padded - len(encode(probe))
        return (lambda caps: [len(encode(c)) + extra for c in caps]), ""

    # Only the padded [B, 77] form: exact below the context length; a full row is counted as 78 (truncated).
    def count(caps: list[str]) -> list[int]:
        ids = tok(caps)
        return [int((row != 0).sum()) + (1 if int(row[-1]) != 0 else 0) for row in ids]

    return (
        count,
        "the tokenizer has no encode(): lengths above 76 are shown as 78 (a caption of exactly 77 counts as truncated)",
    )


def check_shards(
    shards: Sequence[str],
    *,
    tokenizer: str | None = "clip",
    image_key: str = DEFAULT_IMAGE_KEY,
    text_key: str = DEFAULT_TEXT_KEY,
    progress: bool = False,
) -> dict:
    """Read every sample of ``shards`` and return the report (the ``--json`` output)."""
    image_exts = [e.strip().lower() for e in image_key.split(";") if e.strip()]
    wanted = set(image_exts) | {text_key}
    count_tokens, tok_name, tok_note = token_counter(tokenizer)
    widths: list[int] = []
    heights: list[int] = []
    lengths: list[int] = []
    bad_shards: list[dict] = []
    bad_samples: list[dict] = []
    per_shard: dict[str, int] = {}
    repaired: Counter = Counter()
    captions: list[str] = []

    def flush() -> None:
        if captions:
            lengths.extend(count_tokens(captions))
            captions.clear()

    bar = _progress(len(shards), progress)
    for url in shards:
        n = 0
        try:
            for record in iter_tar(url, wanted=wanted.__contains__):
                n += 1
                problem = _check_record(record, image_exts, text_key, widths, heights, captions, repaired)
                if problem:
                    bad_samples.append({"shard": url, "key": record.key, **problem})
                if len(captions) >= 512:
                    flush()
        except ShardError as e:
            bad_shards.append({"shard": url, "reason": e.reason, "error": e.message, "samples_read": n})
        per_shard[url] = n
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()

    truncated = sum(1 for n in lengths if n > CONTEXT_LENGTH)
    broken = {b["shard"] for b in bad_shards}
    mismatched = [
        {"shard": u, "sizes_json": known, "found": per_shard[u]}
        for u, known in shard_sizes(list(per_shard)).items()
        if u not in broken and known != per_shard[u]
    ]
    return {
        "shards": len(shards),
        "samples": sum(per_shard.values()),
        "good_samples": sum(per_shard.values()) - len(bad_samples),
        "unreadable_shards": bad_shards,
        "unreadable_samples": bad_samples,
        "unreadable_by_reason": dict(Counter(b["reason"] for b in bad_samples)),
        "repaired": dict(repaired),
        "image_width": _stats(widths),
        "image_height": _stats(heights),
        "caption_tokens": {
            "tokenizer": tok_name,
            "note": tok_note,
            **_stats(lengths),
            "histogram": _histogram(lengths),
        },
        "truncated": {
            "context_length": CONTEXT_LENGTH,
            "count": truncated,
            "rate": truncated / len(lengths) if lengths else 0.0,
        },
        "sizes_json_mismatch": mismatched,
        "samples_per_shard": per_shard,
        "ok": not bad_shards,
    }


def _check_record(record, image_exts, text_key, widths, heights, captions, repaired) -> dict | None:
    if is_unsafe_key(record.key):
        return {"reason": "unsafe_key", "error": "key could escape a directory"}
    data = next((record.fields[e] for e in image_exts if record.fields.get(e) is not None), None)
    problem = None
    if data is None:
        problem = {"reason": "no_image", "error": f"none of {'/'.join(image_exts)}"}
    elif data is TOO_LARGE:
        problem = {"reason": "too_large", "error": "image member over the size limit"}
    else:
        try:
            img = default_decode(data, record.key)
            widths.append(img.width)
            heights.append(img.height)
        except Exception as e:
            problem = {"reason": getattr(e, "reason", None) or "corrupt", "error": f"{type(e).__name__}: {e}"}
    raw = record.fields.get(text_key)
    if raw is None or raw is TOO_LARGE:
        return problem or {"reason": "no_caption", "error": f"no .{text_key} member"}
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError:
        caption = raw.decode("utf-8", errors="replace")
        repaired["caption_not_utf8"] += 1
    caption = caption.strip()
    if not caption:
        return problem or {"reason": "empty_caption", "error": "caption is empty"}
    if problem is None:
        captions.append(caption)
    return problem


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "mean": None}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 2),
    }


def _histogram(lengths: list[int]) -> list[dict]:
    out = []
    for lo, hi in BINS:
        n = sum(1 for v in lengths if v >= lo and (hi is None or v <= hi))
        out.append({"range": f"{lo}-{hi}" if hi else f"{lo}+", "count": n})
    return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="checking", file=sys.stderr, disable=None)


def format_report(report: dict, target: str, max_list: int = 50) -> str:
    """The human-readable report."""
    lines = [f"vlkit data check {target}"]
    lines.append(
        f"  shards: {report['shards']} ({len(report['unreadable_shards'])} unreadable)   "
        f"samples: {report['samples']} ({len(report['unreadable_samples'])} unreadable)"
    )
    for dim in ("width", "height"):
        s = report[f"image_{dim}"]
        if s["min"] is not None:
            lines.append(f"  image {dim:<6}: min {s['min']}  median {s['median']:g}  max {s['max']}")
    tok = report["caption_tokens"]
    if tok["min"] is not None:
        lines.append(
            f"  caption length in tokens ({tok['tokenizer']}): min {tok['min']}  median {tok['median']:g}  "
            f"mean {tok['mean']}  max {tok['max']}"
        )
        if tok["note"]:
            lines.append(f"    note: {tok['note']}")
        peak = max(b["count"] for b in tok["histogram"]) or 1
        for b in tok["histogram"]:
            bar = "#" * round(40 * b["count"] / peak)
            lines.append(f"    {b['range']:>8} | {bar:<40} {b['count']}")
        t = report["truncated"]
        lines.append(f"  truncated (> {t['context_length']} tokens): {t['count']} ({100 * t['rate']:.2f}%)")
    if report["repaired"]:
        lines.append(f"  repaired: {report['repaired']} (non-UTF-8 captions are decoded with replacement)")
    for m in report["sizes_json_mismatch"]:
        lines.append(f"  sizes.json says {m['sizes_json']} samples for {m['shard']}, found {m['found']}")
    if report["unreadable_shards"]:
        lines.append("  unreadable shards:")
        for b in report["unreadable_shards"]:
            lines.append(f"    {b['shard']}: {b['reason']} after {b['samples_read']} samples ({b['error']})")
    bad = report["unreadable_samples"]
    if bad:
        lines.append(f"  unreadable samples ({dict(report['unreadable_by_reason'])}):")
        for b in bad[:max_list]:
            lines.append(f"    {b['shard']} :: {b['key']}: {b['reason']} ({b['error']})")
        if len(bad) > max_list:
            lines.append(f"    ... and {len(bad) - max_list} more (all of them with --json)")
    lines.append("  OK" if report["ok"] else "  FAILED: some shards cannot be read")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="DIR_OR_PATTERN", help="a directory (searched recursively), shard, brace or glob")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--tokenizer", default="clip", help="tokenizer to count caption tokens with (default clip; 'words': words)"
    )
    p.add_argument("--image-key", default=DEFAULT_IMAGE_KEY, help="image extensions, ';'-separated")
    p.add_argument("--text-key", default=DEFAULT_TEXT_KEY, help="caption extension")
    p.add_argument("--max-list", type=int, default=50, help="unreadable samples listed in the text report")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` to the ``vlkit data`` sub-commands."""
    p = subparsers.add_parser(
        "check",
        help="count and validate webdataset shards: sizes, caption tokens, truncation, unreadable samples",
        description=__doc__.replace("``", ""),  # docstring markup is noise in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shards = find_shards(args.target)
    if not shards:
        print(f"vlkit data check: error: no .tar shards found at {args.target!r}", file=sys.stderr)
        return 2
    report = check_shards(
        shards,
        tokenizer=args.tokenizer,
        image_key=args.image_key,
        text_key=args.text_key,
        progress=not args.json,
    )
    report["target"] = args.target
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report, args.target, args.max_list))
    return 0 if report["ok"] else 1
