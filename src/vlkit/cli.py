"""The ``vlkit`` command line: info | train | eval | convert | chat | data | bench | demo.

Exit codes: 0 success, 2 bad usage or config (the message names the problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from vlkit import __version__
from vlkit.config import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Commands whose capability has not landed yet: name -> (one-line help, the issue that delivers it).
PLANNED = {
    "train": ("train a model from a config (single process or under torchrun)", "the Trainer issue"),
    "eval": ("evaluate: zeroshot | retrieval | classify", "the Evaluation issue"),
    "convert": ("convert checkpoints from/to Hugging Face and open_clip", "the Interop issue"),
    "chat": ("chat with a NeVA model about an image", "the NeVA issue"),
    "data": ("dataset tools: shapes (synthetic dataset) | check", "the Data pipeline issue"),
    "demo": ("the main job: synthetic data, train a small CLIP on the CPU, evaluate, report", "the Evaluation issue"),
}


def _not_available(name: str, issue: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"vlkit {name}: not available yet (delivered by {issue}).", file=sys.stderr)
        return EXIT_USAGE

    return run


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="resolved config, parameter counts per tower, FLOPs per sample",
        description="Resolve a preset or YAML config (with key=value overrides) and report the model it builds: "
        "the resolved config, parameter counts per tower and FLOPs per sample, traced with "
        "torch.utils.flop_counter on the meta device (no weights are allocated).",
    )
    p.add_argument("config", help="preset name (e.g. clip-b16; see --list) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.vision.num_layers=6")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-config", action="store_true", help="omit the resolved config from the text output")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from vlkit.info import describe, format_report

    report = describe(args.config, args.overrides)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, show_config=not args.no_config))
    return EXIT_OK


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: loss | train", description="Benchmarks, peers side by side.")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{loss,train}", required=True)
    try:
        loss = importlib.import_module("vlkit.bench.loss")
    except ImportError:
        loss = None
    lp = bench_sub.add_parser("loss", help="contrastive loss: time and memory of every implementation and the peers")
    if loss is not None:
        loss.add_arguments(lp)
        lp.set_defaults(func=loss.run)
    else:
        lp.set_defaults(func=_not_available("bench loss", "the Contrastive loss engine issue"))
    tp = bench_sub.add_parser("train", help="training throughput and MFU against the peers")
    tp.set_defaults(func=_not_available("bench train", "the Trainer issue"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlkit",
        description="Pretrain, fine-tune, evaluate and serve vision-language models (CLIP, ViT, NeVA).",
        epilog="Run 'vlkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vlkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    for name in ("train", "eval", "convert", "chat", "data"):
        _add_planned(sub, name)
    _add_bench(sub)
    _add_planned(sub, "demo")
    return parser


def _add_planned(sub: argparse._SubParsersAction, name: str) -> None:
    help_text, issue = PLANNED[name]
    p = sub.add_parser(name, help=f"{help_text} [not available yet]", description=f"{help_text}. Not available yet.")
    p.set_defaults(func=_not_available(name, issue), planned=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # A command that has not landed accepts (and ignores) whatever options its future form will take.
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "planned", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or EXIT_OK)
    except ConfigError as e:
        print(f"vlkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
