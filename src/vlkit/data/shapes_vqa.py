"""Synthetic instruction data from the shapes scenes (``vlkit data shapes-vqa``): NeVA training without downloads.

The scenes are those of ``vlkit data shapes`` (same seed, same split streams, same held-out background x position
pairs), rendered as PNG files and described in LLaVA JSON twice:

* ``pretrain_{train,val}.json``: one exchange per image, an instruction and the caption -- stage 1 (feature
  alignment) with the ``plain`` template, which keeps only the image and the caption;
* ``instruct_{train,val}.json``: one to three rounds of questions about the main object with short answers
  ("What colour is the shape?" -> "red", "What shape is it?" -> "circle", "Describe the image." -> the caption) --
  stage 2 (instruction tuning) with any chat template.

A byte-level BPE ``tokenizer/tokenizer.json`` trained on the generated text, with every special token the templates
need (:data:`vlkit.data.conversation.ALL_SPECIAL_TOKENS`), makes the ``neva-tiny`` presets run fully offline. The
same arguments give byte-identical files. See docs/data.md ("Conversations (NeVA)").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vlkit.data.conversation import ALL_SPECIAL_TOKENS, IMAGE_TOKEN, TEMPLATES, Turn
from vlkit.data.shapes import SPLITS, add_scene_arguments, balanced_labels, make_sample
from vlkit.data.shapes_render import DEFAULT_COLORS, DEFAULT_SHAPES, PALETTE, SHAPES, Scene, class_names, render
from vlkit.utils.argtypes import positive_int

GENERATOR = "vlkit data shapes-vqa"
FORMAT_VERSION = 1
INDEX_FILE = "dataset.json"
DEFAULTS = {"train": 5000, "val": 500, "size": 32, "seed": 0, "second_prob": 0.2, "vocab_size": 512}
# Our top-level outputs (dataset.json is written last: its presence means a complete dataset).
_OUTPUTS = ("images", "tokenizer", *(f"{kind}_{split}.json" for kind in ("pretrain", "instruct") for split in SPLITS))

PRETRAIN_PROMPTS = (
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "What is in this picture?",
    "Give a brief description of the image.",
)
# Question kinds: phrasings, and how often a kind is drawn relative to the others (colour and shape are the skills
# the tiny recipe is judged on, so they come up most).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What colour is the shape?", "What color is the shape?", "What colour is the main object?"),
    "shape": ("What shape is it?", "What shape is shown?", "Which shape is in the image?"),
    "size": ("How big is the shape?", "What size is the shape?"),
    "position": ("Where is the shape?", "Where in the image is the shape?"),
    "background": ("What does the background look like?", "What kind of background is it?"),
    "count": ("How many shapes are there?", "How many objects are in the image?"),
    "verify_color": ("Is the shape {}?",),
    "verify_shape": ("Is it a {}?",),
    "describe": ("Describe the image.", "What does the image show?"),
}
QUESTION_WEIGHTS = {"color": 3, "shape": 3, "size": 1, "position": 1, "background": 1, "count": 1,
                    "verify_color": 1, "verify_shape": 1, "describe": 1}  # fmt: skip
MAX_ROUNDS = 3


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def answer(kind: str, scene: Scene, caption: str, rng: np.random.Generator, colors: Sequence[str],
           shapes: Sequence[str]) -> tuple[str, str]:  # fmt: skip
    """(question, answer) of one kind about ``scene``; yes/no questions are true half of the time."""
    main = scene.main
    question = _pick(rng, QUESTIONS[kind])
    if kind == "color":
        return question, main.color
    if kind == "shape":
        return question, main.shape
    if kind == "size":
        return question, main.size
    if kind == "position":
        return question, main.position
    if kind == "background":
        return question, scene.background
    if kind == "count":
        return question, "two" if scene.second is not None else "one"
    if kind in ("verify_color", "verify_shape"):
        truth, pool = (main.color, colors) if kind == "verify_color" else (main.shape, shapes)
        asked = truth if rng.uniform() < 0.5 else _pick(rng, [v for v in pool if v != truth])
        return question.format(asked), "yes" if asked == truth else "no"
    if kind == "describe":
        return question, caption
    raise ValueError(f"unknown question kind {kind!r}")


def instruct_turns(scene: Scene, caption: str, rng: np.random.Generator, colors: Sequence[str],
                   shapes: Sequence[str]) -> list[dict]:  # fmt: skip
    """1 to 3 rounds of distinct question kinds, the image placeholder in front of the first question."""
    kinds = list(QUESTION_WEIGHTS)
    weights = np.array([QUESTION_WEIGHTS[k] for k in kinds], dtype=np.float64)
    rounds = int(rng.integers(1, MAX_ROUNDS + 1))
    chosen = rng.choice(len(kinds), size=rounds, replace=False, p=weights / weights.sum())
    turns = []
    for n, k in enumerate(chosen.tolist()):
        question, reply = answer(kinds[k], scene, caption, rng, colors, shapes)
        turns += [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if n == 0 else question},
            {"from": "gpt", "value": reply},
        ]
    return turns


def _samples(split: str, n: int, seed: int, size: int, options: dict) -> Iterable[tuple[str, bytes, dict, dict]]:
    """(key, PNG bytes, pretrain record, instruct record) per sample; each sample has its own seed streams."""
    classes = class_names(options["shapes"], options["colors"])
    labels = balanced_labels(n, len(classes), seed, split).tolist()
    for index, label in enumerate(labels):
        scene, caption, _ = make_sample(seed, split, index, label, **options)
        rng = np.random.default_rng([seed, SPLITS[split], 2, index])  # stream 2: the questions (1 is the scene's)
        key = f"{split}_{index:07d}"
        image = f"images/{split}/{key}.png"
        buf = io.BytesIO()
        render(scene, size).save(buf, "PNG")
        pretrain = {
            "id": key,
            "image": image,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{_pick(rng, PRETRAIN_PROMPTS)}"},
                {"from": "gpt", "value": caption},
            ],
        }
        turns = instruct_turns(scene, caption, rng, options["colors"], options["shapes"])
        yield key, buf.getvalue(), pretrain, {"id": key, "image": image, "conversations": turns}


# ---------------------------------------------------------------------------------------------------------- tokenizer


def template_texts() -> list[str]:
    """Every template's markup and default system prompt, rendered on a sample exchange (tokenizer training text)."""
    turns = [Turn("human", "What colour is the shape?"), Turn("gpt", "red")]
    texts = []
    for template in TEMPLATES.values():
        texts.append("".join(s.text for s in template.segments(turns)))
    return texts


def train_chat_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = DEFAULTS["vocab_size"],
    special_tokens: Sequence[str] = ALL_SPECIAL_TOKENS,
) -> Path:
    """Train a small byte-level BPE tokenizer with Hugging Face ``tokenizers`` and write it for ``get_tokenizer``.

    Byte-level BPE encodes any text (no unknown tokens) and decodes it exactly. The special tokens come first, so
    with the default list ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` are ids 0-3 (LLaMA's order for the first three);
    they are added tokens, never split or merged with neighbouring text. Special tokens inside ``texts`` are blanked
    before training. Deterministic: the same texts give the same file.

    Args:
        texts: the training text.
        out_dir: where ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos/pad/unk names) are written.
        vocab_size: total vocabulary including the 256 byte symbols and the special tokens.
        special_tokens: tokens registered as special.

    Returns:
        The directory (load it with ``vlkit.data.tokenizer.get_tokenizer(out_dir)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the {minimum} byte symbols and special tokens")

    def cleaned() -> Iterable[str]:
        for text in texts:
            for token in special_tokens:
                text = text.replace(token, " ")
            yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(cleaned(), trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    names = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {k: v for k, v in names.items() if v in special_tokens}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------------------ writing


def _check_out_dir(out: Path) -> None:
    """Refuse to replace outputs this command did not write: they may be someone's data."""
    if not any((out / name).exists() for name in _OUTPUTS):
        return
    try:
        ours = json.loads((out / INDEX_FILE).read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out} already holds images/, tokenizer/ or *_train/val.json that '{GENERATOR}' did not write "
            f"(no {INDEX_FILE} of ours); choose another --out or remove them"
        )


def _dump(path: Path, obj: object) -> None:
    # A list is written one sample per line: still one JSON document, but readable and diffable.
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in obj) + "\n]\n"
    else:
        text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def write_shapes_vqa(
    out_dir: str | os.PathLike,
    *,
    train: int = DEFAULTS["train"],
    val: int = DEFAULTS["val"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    second_prob: float = DEFAULTS["second_prob"],
    heldout: bool = True,
    tokenizer: bool = True,
    vocab_size: int = DEFAULTS["vocab_size"],
    progress: bool = True,
) -> dict:
    """Write the synthetic instruction dataset and return a summary.

    Layout: ``images/{train,val}/KEY.png``, ``pretrain_{train,val}.json``, ``instruct_{train,val}.json`` (LLaVA
    JSON; image paths relative to ``out_dir``), ``tokenizer/`` (unless ``tokenizer=False``) and ``dataset.json``
    (what was generated, with which options). Everything is staged in a hidden directory and moved into place,
    ``dataset.json`` last. The same arguments give byte-identical files.

    Args:
        out_dir: output directory (created if needed). Earlier output of this function there is replaced; files of
            the same names written by anything else are refused.
        train, val: images per split (val is the held-out split: its own seed stream and, with ``heldout``, the
            only split showing some background x position pairs).
        size: image side in pixels (16-1024).
        seed: dataset seed; the scenes are those of ``vlkit data shapes`` with the same seed and options.
        shapes, colors, second_prob, heldout: as for ``vlkit data shapes``.
        tokenizer: also train ``tokenizer/tokenizer.json`` on the generated training text.
        vocab_size: the tokenizer's vocabulary size (at least 256 + the special tokens).
        progress: show a progress bar.

    Raises:
        ValueError: an invalid argument, or an ``out_dir`` holding files this function did not write.
    """
    from tqdm import tqdm

    shapes, colors = tuple(shapes), tuple(colors)
    _validate(train, val, size, seed, shapes, colors, second_prob, vocab_size)
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out)
    for stale in out.glob(".shapes-vqa-staging-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    options = {"shapes": shapes, "colors": colors, "second_prob": second_prob, "heldout": heldout}
    staging = Path(tempfile.mkdtemp(prefix=".shapes-vqa-staging-", dir=out))
    counts = {"train": train, "val": val}
    texts: list[str] = []
    try:
        with tqdm(total=train + val, unit="img", desc="shapes-vqa", disable=not progress, file=sys.stderr) as bar:
            for split, n in counts.items():
                image_dir = staging / "images" / split
                image_dir.mkdir(parents=True)
                pretrain, instruct = [], []
                for key, png, pre, ins in _samples(split, n, seed, size, options):
                    (image_dir / f"{key}.png").write_bytes(png)
                    pretrain.append(pre)
                    instruct.append(ins)
                    if split == "train":
                        texts += [t["value"] for t in pre["conversations"] + ins["conversations"]]
                    bar.update(1)
                _dump(staging / f"pretrain_{split}.json", pretrain)
                _dump(staging / f"instruct_{split}.json", instruct)
        if tokenizer:
            train_chat_tokenizer([*template_texts(), *texts], staging / "tokenizer", vocab_size=vocab_size)
        files = {
            "pretrain": {s: f"pretrain_{s}.json" for s in counts},
            "instruct": {s: f"instruct_{s}.json" for s in counts},
            "images": "images",
            "tokenizer": "tokenizer" if tokenizer else None,
        }
        index = {
            "generator": GENERATOR,
            "version": FORMAT_VERSION,
            "seed": seed,
            "size": size,
            "samples": counts,
            "shapes": list(shapes),
            "colors": list(colors),
            "second_prob": second_prob,
            "heldout": heldout,
            "vocab_size": vocab_size if tokenizer else None,
            "files": files,
            "templates": {"pretrain": "plain", "instruct": "any chat template (vicuna_v1, llama_2, nvgpt, llama_3)"},
        }
        _dump(staging / INDEX_FILE, index)
        # Replace earlier output: the index goes first and comes back last, so it only exists when all is there.
        for name in (INDEX_FILE, *_OUTPUTS):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for name in (*_OUTPUTS, INDEX_FILE):
            if (staging / name).exists():
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "out": str(out),
        "seed": seed,
        "size": size,
        "samples": counts,
        "pretrain": {s: str(out / f) for s, f in files["pretrain"].items()},
        "instruct": {s: str(out / f) for s, f in files["instruct"].items()},
        "tokenizer": str(out / "tokenizer") if tokenizer else None,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _validate(train, val, size, seed, shapes, colors, second_prob, vocab_size) -> None:
    for name, value in (("train", train), ("val", val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 16 <= size <= 1024:
        raise ValueError(f"size must be between 16 and 1024 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for kind, names, known in (("shape", shapes, SHAPES), ("color", colors, tuple(PALETTE))):
        unknown = [n for n in names if n not in known]
        if unknown or len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"{kind}s must be at least two distinct names of {', '.join(known)}; got {list(names)}")
    if not 0.0 <= second_prob <= 1.0:
        raise ValueError(f"second_prob must be in [0, 1], got {second_prob}")
    minimum = 256 + len(ALL_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (byte symbols + special tokens), got {vocab_size}")


# ------------------------------------------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlkit data shapes-vqa``."""
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--train",
        type=positive_int,
        default=DEFAULTS["train"],
        metavar="N",
        help=f"training images (default {DEFAULTS['train']})",
    )
    p.add_argument(
        "--val",
        type=positive_int,
        default=DEFAULTS["val"],
        metavar="M",
        help=f"held-out images (default {DEFAULTS['val']})",
    )
    add_scene_arguments(p)
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=DEFAULTS["vocab_size"],
        metavar="V",
        help=f"vocabulary of the trained tokenizer: bytes + special tokens + merges (default {DEFAULTS['vocab_size']})",
    )
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false", help="do not train tokenizer/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``shapes-vqa`` to the ``vlkit data`` sub-commands."""
    p = subparsers.add_parser(
        "shapes-vqa",
        help="write synthetic LLaVA instruction data from the shapes scenes (NeVA, offline)",
        description="Write the shapes scenes as PNG files with LLaVA JSON for NeVA: pretrain_{train,val}.json "
        "(image + caption, stage 1, template plain) and instruct_{train,val}.json (questions such as 'What colour "
        "is the shape?' -> 'red', stage 2), plus a byte-level BPE tokenizer/ trained on the text with every "
        "template's special tokens. The same seed gives byte-identical files.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit data shapes-vqa``; returns the exit code (2 for bad arguments or an output directory not ours)."""
    try:
        summary = write_shapes_vqa(
            args.out,
            train=args.train,
            val=args.val,
            size=args.size,
            seed=args.seed,
            shapes=args.shapes,
            colors=args.colors,
            second_prob=args.second_prob,
            heldout=args.heldout,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            progress=not (args.quiet or args.json),
        )
    except ValueError as e:
        print(f"vlkit data shapes-vqa: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        n = summary["samples"]
        print(f"wrote {n['train']} train + {n['val']} val images ({summary['size']} px, seed {summary['seed']}) "
              f"in {summary['seconds']:.1f} s to {summary['out']}")  # fmt: skip
        for kind in ("pretrain", "instruct"):
            print(f"  {kind}: {summary[kind]['train']}, {summary[kind]['val']}")
        if summary["tokenizer"]:
            print(f"  tokenizer: {summary['tokenizer']}")
    return 0


__all__ = ["register", "run", "train_chat_tokenizer", "write_shapes_vqa"]
