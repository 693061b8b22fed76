"""``vlkit predict --model PATH IMAGE... [--topk 5] [--json]``: the top classes of each image.

A ViT classifier's class names come from a ``classes.json`` in the model directory or the two folders above it (a
training run writes one next to its checkpoints and into its output directory); without one, classes are shown by
index. A CLIP model classifies zero-shot among the user's ``--labels`` (or ``--labels-file``): each label's
embedding averages OpenAI's prompt templates, encoded with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlkit.utils.argtypes import positive_int

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
CLASSES_FILE = "classes.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-k classes of images: a ViT classifier, or a CLIP model zero-shot with your own labels",
        description="Classify images and print the top-k classes with their probabilities. A ViT classifier's "
        "class names come from classes.json in the model directory (or the run directory above it). A CLIP model "
        "classifies zero-shot among --labels (or --labels-file), each label prompted with OpenAI's 80 templates "
        "('a photo of a {}.', ...; --templates) and encoded with the model's tokenizer.",
        epilog="examples:\n  vlkit predict --model runs/vit-tiny-shapes cat.png dog.jpg\n"
        "  vlkit predict --model runs/vit-tiny-shapes/model_ema --topk 3 --json img/*.png\n"
        '  vlkit predict --model models/clip-b32 --labels "cat,dog,car" photo1.jpg photo2.jpg\n'
        "  vlkit predict --model runs/demo/run/model --labels-file labels.txt --templates simple img.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="a model or checkpoint directory, or a run directory (its latest "
                   "checkpoint)")  # fmt: skip
    p.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="CLIP models: the candidate labels, comma-separated ('cat,dog,car')")
    labels.add_argument("--labels-file", help="CLIP models: a file with one label per line (or a JSON list)")
    p.add_argument("--templates", default="openai", help="CLIP models: the prompt templates: openai (80, default), "
                   "openai7, simple ('a photo of a {}.'), or a file with one template per line")  # fmt: skip
    p.set_defaults(func=run)


def find_class_names(model_dir: str | os.PathLike, num_classes: int) -> list[str] | None:
    """Names from the first ``classes.json`` in ``model_dir``, its parent or grandparent whose class count matches.

    Raises:
        ValueError: the nearest ``classes.json`` cannot be read.
    """
    from vlkit.data.imagefolder import read_class_index

    folder = Path(model_dir).resolve()
    for candidate in (folder / CLASSES_FILE, folder.parent / CLASSES_FILE, folder.parent.parent / CLASSES_FILE):
        if candidate.is_file():
            names = read_class_index(candidate)[0]
            if len(names) == num_classes:
                return names
            print(f"vlkit predict: warning: {candidate} lists {len(names)} classes, the model has {num_classes}; "
                  "showing class indices", file=sys.stderr)  # fmt: skip
            return None
    return None


def predict(model: Any, images: list[Any], topk: int = 5, batch_size: int = 32) -> list[list[tuple[int, float]]]:
    """(class index, probability) pairs, best first, for each PIL image."""
    import torch

    from vlkit.data.transforms import get_transform
    from vlkit.utils.modules import model_device

    transform = get_transform(model, train=False)
    device = model_device(model)
    k = min(topk, model.config.num_classes)
    out: list[list[tuple[int, float]]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([transform(img) for img in images[start : start + batch_size]]).to(device)
            probs = model(pixels).float().softmax(dim=-1)
            values, indices = probs.topk(k, dim=-1)
            out += [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return out


def parse_labels(labels: str | None, labels_file: str | None) -> list[str] | None:
    """The labels of ``--labels`` (comma-separated) or ``--labels-file``; None when neither is given.

    Raises:
        FileNotFoundError / ValueError: the file is missing or unreadable, or a label is empty or repeated.
    """
    from vlkit.eval.templates import read_text_list

    if labels is None and labels_file is None:
        return None
    names = [n.strip() for n in labels.split(",")] if labels is not None else read_text_list(labels_file, "labels")
    where = "--labels" if labels is not None else labels_file
    if not names or any(not n for n in names):
        raise ValueError(f"{where}: empty label in {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: repeated label(s) {', '.join(repeated)}")
    return names


def predict_zeroshot(
    model: Any, images: list[Any], labels: list[str], templates: list[str], topk: int = 5, batch_size: int = 32
) -> list[list[tuple[int, float]]]:
    """(label index, probability) pairs, best first, for each PIL image, from a CLIP model and its own tokenizer
    and transform: the softmax over the labels of the model's logit scale times the cosine similarities."""
    import torch
    import torch.nn.functional as F

    from vlkit.data.tokenizer import get_tokenizer
    from vlkit.data.transforms import get_transform
    from vlkit.eval.runtime import logit_scale
    from vlkit.eval.zeroshot import build_classifier
    from vlkit.utils.modules import model_device

    text_cfg = model.config.text
    tokenizer = get_tokenizer(text_cfg.tokenizer, text_cfg.encoder_seq_length)
    transform = get_transform(model, train=False)
    device = model_device(model)
    k = min(topk, len(labels))
    model.eval()
    out: list[list[tuple[int, float]]] = []
    with torch.no_grad():
        classifier = build_classifier(model, labels, templates, tokenizer, precision="fp32")
        scale = logit_scale(model)
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([transform(img) for img in images[start : start + batch_size]]).to(device)
            features = F.normalize(model.encode_image(pixels).float(), dim=-1)
            probs = (scale * features @ classifier.T).softmax(dim=-1)
            values, indices = probs.topk(k, dim=-1)
            out += [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return out


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        print(f"vlkit predict: error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.exists(args.model):
        print(f"vlkit predict: error: --model {args.model}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE

    from vlkit.config import ConfigError
    from vlkit.data.images import ImageDecodeError, read_image, to_rgb
    from vlkit.eval.results import EvalUsageError
    from vlkit.eval.runtime import resolve_device
    from vlkit.eval.templates import resolve_templates
    from vlkit.interop.native import ModelFormatError, load_model, resolve_model_path

    try:  # before the model is loaded: a typo in a file name fails at once
        labels = parse_labels(args.labels, args.labels_file)
        templates = resolve_templates(args.templates)[0] if labels is not None else None
    except (OSError, ValueError) as e:
        print(f"vlkit predict: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    model_path = resolve_model_path(args.model)
    try:
        model = load_model(model_path, device=resolve_device(args.device))
        is_clip = callable(getattr(model, "encode_text", None)) and callable(getattr(model, "encode_image", None))
        names = None if is_clip else find_class_names(model_path, getattr(model.config, "num_classes", 0) or 0)
    except (ModelFormatError, ConfigError, EvalUsageError, ValueError) as e:
        print(f"vlkit predict: error: --model {args.model}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if is_clip and labels is None:
        print(f"vlkit predict: error: --model {args.model} is a CLIP model: give the candidate labels with "
              '--labels "cat,dog,car" or --labels-file FILE (one per line)', file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if not is_clip and getattr(model.config, "arch", "") != "vit_classifier":
        print(f"vlkit predict: error: --model {args.model} is not a ViT classifier or a CLIP model "
              f"(model.arch={getattr(model.config, 'arch', '?')})", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if not is_clip and labels is not None:
        print(f"vlkit predict: error: --model {args.model} is a ViT classifier: its classes are fixed "
              "(classes.json); --labels / --labels-file are for CLIP models", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if is_clip:
        names = labels

    good, images, failed = [], [], []
    for path in args.images:
        try:
            images.append(to_rgb(read_image(path), key=path))
            good.append(path)
        except (ImageDecodeError, OSError) as e:
            failed.append(path)
            print(f"vlkit predict: error: {path}: {e}", file=sys.stderr)
    if not images:
        results = []
    elif is_clip:
        results = predict_zeroshot(model, images, labels, templates, args.topk, args.batch_size)
    else:
        results = predict(model, images, args.topk, args.batch_size)

    def name(index: int) -> str:
        return names[index] if names is not None else f"class {index}"

    if args.json:
        rows = [
            {"image": path, "predictions": [{"index": i, "class": name(i), "probability": p} for i, p in top]}
            for path, top in zip(good, results)
        ]
        print(json.dumps(rows, indent=2))
    else:
        for path, top in zip(good, results):
            print(path)
            for i, p in top:
                print(f"  {p:.4f}  {name(i)}")
    return EXIT_ERROR if failed else EXIT_OK
