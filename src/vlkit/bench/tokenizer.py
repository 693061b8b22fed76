"""CLIP tokenizer throughput: vlkit vs open_clip (and Hugging Face's CLIPTokenizer) on the same synthetic captions.

Each tokenizer is built fresh, then tokenizes all captions into a [N, 77] tensor: the first pass starts with empty
caches (as a training run's first batches do); later passes show the warmed-up speed. vlkit's output is checked
against open_clip's, row by row, in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_SUBJECTS = (
    "dog", "cat", "man", "woman", "child", "girl", "boy", "horse", "bird", "car", "bus", "train", "bicycle", "truck",
    "boat", "plane", "house", "church", "bridge", "tree", "flower", "cake", "pizza", "sandwich", "coffee cup",
    "laptop", "phone", "guitar", "teddy bear", "umbrella", "giraffe", "elephant", "zebra", "surfer", "skier",
    "skateboarder", "chef", "soldier", "bride", "couple", "family", "team", "crowd", "puppy", "kitten", "owl",
    "fox", "deer", "sheep", "cow", "lighthouse", "castle", "mountain", "waterfall", "beach", "forest", "street",
    "kitchen", "bedroom", "living room", "office", "garden", "stadium", "market", "museum", "sofa", "table",
    "vase", "painting", "sculpture", "logo", "poster", "map", "chart", "dress", "jacket", "sneakers", "watch",
)  # fmt: skip
_ADJECTIVES = (
    "small", "large", "red", "blue", "green", "yellow", "black", "white", "old", "young", "happy", "smiling",
    "wooden", "modern", "vintage", "beautiful", "cute", "fluffy", "shiny", "empty", "crowded", "colorful",
    "dark", "bright", "tall", "tiny", "rusty", "golden", "snowy", "wet", "abandoned", "traditional", "elegant",
)  # fmt: skip
_ACTIONS = (
    "sitting on", "standing next to", "walking along", "running through", "lying on", "playing with",
    "looking at", "holding", "riding", "parked in front of", "flying over", "swimming in", "hanging above",
    "leaning against", "eating", "carrying", "jumping over", "waiting at",
)  # fmt: skip
_PLACES = (
    "the park", "a city street", "the beach", "a wooden table", "the snow", "a grassy field", "the kitchen",
    "an old building", "the river", "a busy market", "the mountains", "a parking lot", "the airport", "a garden",
    "the living room", "a dirt road", "the ocean", "a brick wall", "the train station", "a sunny day",
)  # fmt: skip
_BRANDS = ("Nike", "IKEA", "Canon EOS 5D", "iPhone 14 Pro", "Levi's", "Samsung", "Lego", "Adidas", "Sony A7 III")
# Non-ASCII words and marks, combined at random so that (like real captions) few non-ASCII captions repeat.
_FOREIGN = (
    "café", "crème", "brûlée", "naïve", "élégant", "fête", "château", "niño", "mañana", "señora", "playa", "corazón",
    "straße", "mädchen", "schön", "grün", "über", "münchen", "são", "coração", "ørsted", "fjörður", "kraków",
    "łódź", "český", "şehir", "ελληνικό", "νησί", "θάλασσα", "москва", "красная", "площадь", "зима", "кошка",
    "東京タワー", "夜景", "北京", "故宫", "秋天", "桜", "ラーメン", "서울", "벚꽃", "축제", "مراكش", "المدينة",
    "ירושלים", "נוף", "हिन्दी", "ภาษาไทย",
)  # fmt: skip
_MARKS = (
    "🎂", "🎉", "😊", "🌅", "☀️", "❤️", "👍🏽", "👨\u200d👩\u200d👧", "’s", "“best”", "—", "…", "™", "®", "©",
    "°C", "€", "£", "½", "\xa0",
)  # fmt: skip


def _foreign(rng: random.Random) -> str:
    words = [rng.choice(_FOREIGN) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_SUBJECTS))
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_MARKS))
    if rng.random() < 0.3:
        words.append(str(rng.randint(1, 2024)))
    caption = " ".join(words)
    return caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption


def _templated(rng: random.Random) -> str:
    caption = f"{rng.choice(('a', 'the', 'two', 'three', 'an old photo of a'))} {rng.choice(_ADJECTIVES)} "
    caption += f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"
    if rng.random() < 0.4:
        caption += f" with a {rng.choice(_ADJECTIVES)} {rng.choice(_SUBJECTS)}"
    if rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:] + "."
    return caption


def _alt_text(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"{rng.choice(_BRANDS)} {rng.choice(_ADJECTIVES).title()} {rng.choice(_SUBJECTS).title()} - "
            f"Size {rng.randint(2, 48)} | SKU-{rng.randint(10000, 99999)} "
            f"(${rng.randint(5, 500)}.{rng.randint(0, 99):02d})"
        )
    if kind == 1:
        return f"IMG_{rng.randint(1000, 9999)}.JPG"
    if kind == 2:
        tags = " ".join("#" + rng.choice(_SUBJECTS).replace(" ", "") for _ in range(rng.randint(1, 5)))
        return f"Stock Photo: {_templated(rng)} {tags}"
    url = f"https://example.com/p/{rng.randint(1, 10**6)}"
    return f"{rng.randint(1950, 2024)} {rng.choice(_SUBJECTS)} {rng.randint(1, 99)}% off!!! {url}"


def _html(rng: random.Random) -> str:
    a, b = rng.choice(_SUBJECTS), rng.choice(_SUBJECTS)
    return rng.choice((f"{a.title()} &amp; {b.title()}", f"&quot;{a}&quot; by {b}", f"Rock &#39;n&#39; roll {a}"))


def _long(rng: random.Random) -> str:
    return " ".join(_templated(rng) for _ in range(rng.randint(6, 14)))


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """A deterministic, web-like caption mix.

    About 62% templated English captions (COCO / CC3M style), 15% alt text (products, file names, hashtags, URLs,
    prices), 10% non-ASCII (accented words, Greek, Cyrillic, CJK, Korean, Arabic, Hebrew, Devanagari, Thai, emoji,
    curly quotes, symbols), 4% HTML entities,
    4% long descriptions (> 77 tokens) and 5% with messy whitespace.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.62:
            caption = _templated(rng)
        elif r < 0.77:
            caption = _alt_text(rng)
        elif r < 0.87:
            caption = _foreign(rng) if rng.random() < 0.7 else f"{_templated(rng)} {rng.choice(_MARKS)}"
        elif r < 0.91:
            caption = _html(rng)
        elif r < 0.95:
            caption = _long(rng)
        else:
            caption = "  " + _templated(rng).replace(" ", rng.choice(("  ", "\n", "\t", " \r\n "))) + " \n"
        out.append(caption)
    return out


def _hf_clip_tokenizer(tmp: Path) -> Callable[[list[str]], torch.Tensor]:
    """transformers' CLIPTokenizer built offline from vlkit's vocabulary, written as vocab.json + merges.txt."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from vlkit.data.tokenizer import CLIPTokenizer

    ours = CLIPTokenizer.from_bpe_file()
    vocab = {("<|startoftext|>" if i == ours.bos_token_id else "<|endoftext|>" if i == ours.eos_token_id else t): i
             for t, i in ours.vocab.items()}  # fmt: skip
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ours.merges), "utf-8")
    hf = HFCLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"))

    def tokenize(captions: list[str]) -> torch.Tensor:
        out = hf(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        # HF pads with <|endoftext|>; open_clip and vlkit pad with 0.
        return out["input_ids"].masked_fill(out["attention_mask"] == 0, 0)

    return tokenize


def run_benchmark(
    n: int = 10_000, seed: int = 0, passes: int = 3, peers: tuple[str, ...] = ("open_clip", "hf")
) -> dict:
    """Tokenize ``n`` synthetic captions with vlkit and each available peer; strings per second and agreement.

    Args:
        n: number of captions.
        seed: seed of the caption mix.
        passes: tokenizations of the whole batch per tokenizer (the first with cold caches).
        peers: among ``open_clip`` and ``hf`` (transformers' CLIPTokenizer); a peer that is not installed is
            reported as skipped.

    Returns:
        A JSON-ready dict: ``results`` per tokenizer, ``speedup_vs_open_clip``, agreement with open_clip.
    """
    from vlkit.data.tokenizer import CLIPTokenizer, cleaning_path

    captions = synthetic_captions(n, seed)
    paths = [cleaning_path(c) for c in captions]
    report: dict[str, Any] = {
        "n": n,
        "seed": seed,
        "passes": passes,
        "context_length": 77,
        "cleaning_paths": {p: paths.count(p) / max(n, 1) for p in ("ascii", "unicode", "ftfy")},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "results": {},
        "skipped": {},
    }
    builders: dict[str, Callable[[], Callable[[list[str]], torch.Tensor]]] = {"vlkit": CLIPTokenizer.from_bpe_file}
    if "open_clip" in peers:
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as e:
            report["skipped"]["open_clip"] = f"not importable: {e}"
        else:
            builders["open_clip"] = SimpleTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if "hf" in peers:
            try:
                import transformers  # noqa: F401
            except ImportError as e:
                report["skipped"]["hf_clip"] = f"not importable: {e}"
            else:
                builders["hf_clip"] = lambda: _hf_clip_tokenizer(Path(tmp))
        tokenizers, seconds, outputs = {}, {}, {}
        for name, build in builders.items():
            start = time.perf_counter()
            tokenizers[name] = build()
            report["results"][name] = {"setup_s": time.perf_counter() - start}
            seconds[name] = []
        # Passes interleave the tokenizers, so that a change in the machine's load affects them alike.
        for _ in range(passes):
            for name, tokenize in tokenizers.items():
                start = time.perf_counter()
                outputs[name] = tokenize(captions)
                seconds[name].append(time.perf_counter() - start)
    for name, times in seconds.items():
        result = report["results"][name]
        result.update(first_pass_s=times[0], first_pass_strings_per_s=n / times[0])
        if passes > 1:
            result.update(repeat_best_s=min(times[1:]), repeat_strings_per_s=n / min(times[1:]))
    ours = outputs["vlkit"]
    if "open_clip" in outputs:
        theirs = outputs["open_clip"]
        report["identical_to_open_clip"] = bool(torch.equal(ours, theirs))
        report["rows_differing_from_open_clip"] = int((ours != theirs).any(dim=1).sum())
        mine, base = report["results"]["vlkit"], report["results"]["open_clip"]
        report["speedup_vs_open_clip"] = {
            "first_pass": mine["first_pass_strings_per_s"] / base["first_pass_strings_per_s"]
        }
        if passes > 1:
            report["speedup_vs_open_clip"]["repeat"] = mine["repeat_strings_per_s"] / base["repeat_strings_per_s"]
    if "hf_clip" in outputs:
        # HF's CLIPTokenizer skips ftfy and HTML unescaping, so some rows differ by design.
        report["rows_differing_hf_vs_vlkit"] = int((ours != outputs["hf_clip"]).any(dim=1).sum())
    return report


def format_table(report: dict) -> str:
    """The report as a text table."""
    paths = report["cleaning_paths"]
    lines = [
        f"CLIP tokenizer: {report['n']} synthetic captions -> [N, {report['context_length']}], "
        f"{report['passes']} passes (cleaning: {paths['ascii']:.1%} plain ASCII, {paths['unicode']:.1%} Unicode "
        f"that ftfy leaves alone, {paths['ftfy']:.1%} through ftfy)",
        f"{'tokenizer':<12} {'setup s':>8} {'1st pass str/s':>15} {'repeat str/s':>13} {'vs open_clip':>13}",
    ]
    base = report["results"].get("open_clip")
    for name, r in report["results"].items():
        repeat = r.get("repeat_strings_per_s")
        ratio = ""
        if base is not None:
            ratio = f"{r['first_pass_strings_per_s'] / base['first_pass_strings_per_s']:.1f}x"
            if repeat is not None:
                ratio += f" / {repeat / base['repeat_strings_per_s']:.1f}x"
        repeat_text = f"{repeat:,.0f}" if repeat is not None else "-"
        lines.append(
            f"{name:<12} {r['setup_s']:>8.2f} {r['first_pass_strings_per_s']:>15,.0f} {repeat_text:>13} {ratio:>13}"
        )
    if "identical_to_open_clip" in report:
        lines.append(
            f"vlkit ids identical to open_clip: {report['identical_to_open_clip']} "
            f"({report['rows_differing_from_open_clip']} rows differ)"
        )
    if "rows_differing_hf_vs_vlkit" in report:
        lines.append(
            f"hf_clip rows differing from vlkit: {report['rows_differing_hf_vs_vlkit']} "
            "(HF's CLIPTokenizer skips ftfy and HTML unescaping)"
        )
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vlkit bench tokenizer``."""
    parser.description = __doc__.replace("``", "")  # docstring markup is noise in a terminal
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--n", type=int, default=10_000, help="number of captions (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic caption mix (default 0)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the captions per tokenizer (default 3)")
    parser.add_argument(
        "--peers",
        default="open_clip,hf",
        help="comma-separated peers among open_clip,hf (default both); 'none' for vlkit alone",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 on success, 1 when vlkit's ids differ from open_clip's, 2 on bad options."""
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none")
    unknown = sorted(set(peers) - {"open_clip", "hf"})
    if unknown or args.n < 1 or args.passes < 1:
        problem = f"unknown peers {unknown}" if unknown else "--n and --passes must be at least 1"
        print(f"vlkit bench tokenizer: error: {problem}", file=sys.stderr)
        return 2
    report = run_benchmark(n=args.n, seed=args.seed, passes=args.passes, peers=peers)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 1 if report.get("identical_to_open_clip") is False else 0
