"""``vlkit predict --model PATH IMAGE... [--topk 5] [--json]``: the top classes of a ViT classifier for each image.

Class names come from a ``classes.json`` in the model directory or the two folders above it (a training run writes
one next to its checkpoints and into its output directory); without one, classes are shown by index.
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
        help="top-k classes of a ViT classifier for images",
        description="Classify images with a ViT classifier and print the top-k classes with their probabilities. "
        "Class names come from classes.json in the model directory (or the run directory above it).",
        epilog="examples:\n  vlkit predict --model runs/vit-tiny-shapes cat.png dog.jpg\n"
        "  vlkit predict --model runs/vit-tiny-shapes/model_ema --topk 3 --json img/*.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="a model or checkpoint directory, or a run directory (its latest "
                   "checkpoint)")  # fmt: skip
    p.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
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
    from vlkit.eval.common import model_device

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
    from vlkit.eval.cli import resolve_model_path
    from vlkit.eval.common import EvalUsageError, resolve_device
    from vlkit.interop.native import ModelFormatError, load_model

    model_path = resolve_model_path(args.model)
    try:
        model = load_model(model_path, device=resolve_device(args.device))
        names = find_class_names(model_path, getattr(getattr(model, "config", None), "num_classes", 0) or 0)
    except (ModelFormatError, ConfigError, EvalUsageError, ValueError) as e:
        print(f"vlkit predict: error: --model {args.model}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if callable(getattr(model, "encode_text", None)) or getattr(model.config, "arch", "") != "vit_classifier":
        print(f"vlkit predict: error: --model {args.model} is not a ViT classifier (a CLIP model classifies "
              "zero-shot: vlkit eval zeroshot)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE

    good, images, failed = [], [], []
    for path in args.images:
        try:
            images.append(to_rgb(read_image(path), key=path))
            good.append(path)
        except (ImageDecodeError, OSError) as e:
            failed.append(path)
            print(f"vlkit predict: error: {path}: {e}", file=sys.stderr)
    results = predict(model, images, args.topk, args.batch_size) if images else []

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
