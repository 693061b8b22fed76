"""The ``vlkit`` command line: info | train | eval | predict | convert | chat | data | bench | demo.

Exit codes: 0 success, 2 bad usage or config (the message names the problem), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from vlkit import __version__
from vlkit.config import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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


# Sub-commands that live in their own modules. Each module exposes ``register(subparsers)``, which adds its parser(s)
# and sets ``func``.
DATA_COMMANDS = ("vlkit.data.shapes", "vlkit.data.shapes_vqa", "vlkit.data.check", "vlkit.data.write")
BENCH_COMMANDS = ("vlkit.bench.loss", "vlkit.bench.train", "vlkit.bench.tokenizer", "vlkit.bench.data")


def _register_modules(sub: argparse._SubParsersAction, modules: Sequence[str]) -> None:
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
        else:  # a module with one command: add_arguments + run
            p = sub.add_parser(name.rsplit(".", 1)[1], help=(module.__doc__ or "").strip().splitlines()[0])
            module.add_arguments(p)
            p.set_defaults(func=module.run)


def _add_group(
    sub: argparse._SubParsersAction,
    name: str,
    help_text: str,
    modules: Sequence[str],
    load: bool = True,
) -> None:
    """A command with sub-commands, one module each.

    ``load=False`` lists the command without importing its modules (they pull in torch: seconds per ``--help``).
    """
    p = sub.add_parser(name, help=help_text, description=help_text)
    group = p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
    if not load:
        return
    _register_modules(group, modules)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. Given ``argv`` (as ``main`` does), the sub-commands of ``data`` and ``bench`` are imported
    only when ``argv`` names them; without it, everything is loaded."""
    command = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    parser = argparse.ArgumentParser(
        prog="vlkit",
        description="Pretrain, fine-tune, evaluate and serve vision-language models (CLIP, ViT, NeVA).",
        epilog="Run 'vlkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vlkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    _register_modules(sub, ("vlkit.train.cli", "vlkit.eval.cli", "vlkit.predict", "vlkit.interop.cli", "vlkit.chat"))
    _add_group(
        sub,
        "data",
        "dataset tools: the synthetic shapes dataset, checking shards, writing shards",
        DATA_COMMANDS,
        load=command in (None, "data"),
    )
    _add_group(
        sub,
        "bench",
        "benchmarks: our figure and the peers' side by side, in one run",
        BENCH_COMMANDS,
        load=command in (None, "bench"),
    )
    _register_modules(sub, ("vlkit.demo",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except ConfigError as e:
        print(f"vlkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
