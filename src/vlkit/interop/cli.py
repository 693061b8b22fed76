"""``vlkit convert``: Hugging Face / open_clip checkpoints to vlkit directories and back.

``--from FORMAT`` reads the source as that format (default: recognised by content) and ``--to FORMAT`` writes that
format (default: vlkit). Exit codes: 0 success, 2 bad usage or a source that is not what was said (the message
names it), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlkit.utils.errors import UserError

EXIT_OK, EXIT_USAGE = 0, 2
SOURCES = ("hf", "open_clip", "llava", "nemo")
TARGETS = ("vlkit", "hf", "open_clip")
# The keys that fix a model's parameter shapes: a converted model with a preset's shapes is that preset's network,
# up to the settings below (which change the function, not the shapes), reported as differences.
_SHAPE_KEYS = {
    "vision": ("num_layers", "hidden_size", "ffn_size", "patch_dim", "img_h", "img_w"),
    "text": ("num_layers", "hidden_size", "ffn_size", "encoder_seq_length", "vocab_size"),
}
_DETAIL_KEYS = ("num_attention_heads", "activation", "layernorm_epsilon", "crop_style", "resize_interpolation", "mean",
                "std")  # fmt: skip

_EPILOG = """examples:
  vlkit convert --from hf clip-vit-base-patch32/ --out models/clip-b32
  vlkit convert --from open_clip open_clip_pytorch_model.bin --model-name ViT-B-32-quickgelu --out models/b32
  vlkit convert --to hf models/clip-b32 --out exported/clip-b32-hf
  vlkit convert --to open_clip models/clip-b32 --out exported/clip-b32-open_clip
  vlkit convert --from hf clip-vit-base-patch32/ --to open_clip --out exported/b32-open_clip
  vlkit convert --from llava llava-1.5-7b-hf/ --out models/neva-llava-1.5-7b
  vlkit convert --from nemo llama-2-13b-chat-tp8.nemo --out models/llama-2-13b-chat"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints from/to Hugging Face and open_clip (and LLaVA to NeVA)",
        description="Convert a CLIP checkpoint between formats with exact parity: Hugging Face transformers "
        "CLIPModel directories, open_clip directories or checkpoint files, and vlkit directories; Hugging Face "
        "LlavaForConditionalGeneration directories become vlkit NeVA directories (--from llava). The tokenizer "
        "and the preprocessing (image size, mean, std, crop style, interpolation) travel with the weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="the source directory or checkpoint file")
    p.add_argument("--from", dest="source", choices=SOURCES, help="read SRC as this format (default: by content)")
    p.add_argument("--to", dest="target", choices=TARGETS, help="write this format (default: vlkit)")
    p.add_argument("--out", required=True, metavar="DIR", help="the output directory (written atomically)")
    p.add_argument("--model-name", help="--from open_clip with a checkpoint file: the open_clip model name")
    p.add_argument("--config", metavar="JSON", help="--from open_clip with a checkpoint file: its model config")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="SRC is a LoRA run's checkpoint or model directory: write the plain model, adapters merged",
    )
    p.set_defaults(func=run)


class UsageError(UserError):
    """Bad arguments or a source that is not what was said: exit 2."""


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    s, o = src.resolve(), out.resolve()
    if o == s or s.is_relative_to(o) or o.is_relative_to(s):
        raise UsageError(f"--out {out} overlaps the source {src}; write somewhere else")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} exists and is not empty; pass --force to replace it")


def _load(args: argparse.Namespace, src: Path):
    """(model, source format) from SRC."""
    from vlkit.interop.native import detect_format, load_model

    if args.source == "hf":
        from vlkit.interop.hf import load_hf

        return load_hf(src), "hf"
    if args.source == "llava":
        from vlkit.interop.hf_llava import load_hf_llava

        return load_hf_llava(src), "llava"
    if args.source == "nemo":
        from vlkit.interop.nemo import load_nemo

        return load_nemo(src), "nemo"
    if args.source == "open_clip":
        from vlkit.interop.open_clip import load_open_clip

        return load_open_clip(src, model_name=args.model_name, config=args.config), "open_clip"
    kind, _ = detect_format(src)
    return load_model(src), kind


def _source_by_content(src: Path) -> str | None:
    """Neither --from nor --to: read SRC as what its content says (docs/interop.md) and write a vlkit directory.
    Returns the --from value that reads it (None: vlkit's own loader, e.g. a trainer checkpoint)."""
    from vlkit.interop.native import ModelFormatError

    try:
        kind = _detect(src)
    except ModelFormatError as e:
        raise UsageError(f"{e}; say what it is with --from hf|open_clip|llava|nemo") from None
    if kind == "vlkit":
        raise UsageError(f"{src} is already a vlkit model directory; pass --to hf|open_clip to export it")
    print(f"{src}: recognised as {kind} by its content (--from to say otherwise)")
    # the others load by content (open_clip, checkpoints, towers)
    return kind if kind in ("hf", "llava", "nemo") else None


def _detect(src: Path) -> str:
    from vlkit.interop.native import detect_format

    return detect_format(src)[0]


def _save(model, out: Path, target: str) -> None:
    from vlkit.interop.native import save_model

    if target != "vlkit" and getattr(model.config, "arch", None) == "neva":
        raise UsageError(
            f"--to {target}: NeVA models convert to vlkit directories only (the vision blocks after the selected "
            "layer are not kept, so there is no complete Hugging Face LLaVA to write)"
        )

    if target == "hf":
        from vlkit.interop.hf import save_hf

        save_hf(model, out)
    elif target == "open_clip":
        from vlkit.interop.open_clip import save_open_clip

        save_open_clip(model, out)
    else:
        save_model(model, out)


def matching_preset(cfg) -> tuple[str | None, list[str]]:
    """The CLIP preset with ``cfg``'s parameter shapes, and every other setting in which ``cfg`` differs from it
    (the head count, the activation, the preprocessing, ...); ``(None, [])`` when no preset has these shapes."""
    from vlkit.config import list_presets, load_config

    for name in list_presets():
        if not name.startswith("clip-") or name.endswith("-train"):  # -train recipes repeat their model's network
            continue
        preset = load_config(name).model
        if preset.arch != cfg.arch or preset.text is None or cfg.text is None or preset.output_dim != cfg.output_dim:
            continue
        towers = {"vision": (preset.vision, cfg.vision), "text": (preset.text, cfg.text)}
        if all(getattr(a, k) == getattr(b, k) for t, (a, b) in towers.items() for k in _SHAPE_KEYS[t]):
            diffs = [
                f"model.{t}.{k}={getattr(b, k)} (preset: {getattr(a, k)})"
                for t, (a, b) in towers.items()
                for k in _DETAIL_KEYS
                if hasattr(a, k) and getattr(a, k) != getattr(b, k)
            ]
            return name, diffs
    return None, []


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        print(f"vlkit convert: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if (args.model_name or args.config) and args.source != "open_clip":
        raise UsageError("--model-name and --config describe an open_clip checkpoint: use them with --from open_clip")
    src, out = Path(args.src), Path(args.out)
    _check_paths(src, out, args.force)
    if getattr(args, "merge_lora", False):
        from vlkit.interop.lora import load_merged
        from vlkit.interop.native import ModelFormatError

        try:
            _save(load_merged(src), out, args.target or "vlkit")
        except ModelFormatError as e:
            raise UsageError(str(e)) from None
        print(f"{src} (LoRA adapters merged) -> {out} ({args.target or 'vlkit'})")
        return EXIT_OK
    if args.source is None and args.target is None:
        args.source = _source_by_content(src)
    target = args.target or "vlkit"

    from vlkit.interop.native import ModelFormatError

    try:
        if args.source == "hf" and target == "vlkit":
            from vlkit.interop.hf import convert_hf_to_vlkit

            model, kind = convert_hf_to_vlkit(src, out), "hf"  # copies the tokenizer files along
        elif target == "vlkit" and (args.source or _detect(src)) == "llava":
            from vlkit.interop.hf_llava import convert_llava_to_vlkit

            model, kind = convert_llava_to_vlkit(src, out), "llava"  # tokenizer and processor files too
        else:
            model, kind = _load(args, src)
            _save(model, out, target)
    except ModelFormatError as e:
        raise UsageError(str(e)) from None
    print(f"{src} ({kind}) -> {out} ({target})")
    preset, diffs = matching_preset(model.config)
    if preset is not None:
        print(f"architecture: the {preset} preset" + (f", except {'; '.join(diffs)}" if diffs else ""))
    return EXIT_OK
