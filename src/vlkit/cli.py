"""The ``vlkit`` command line: info | train | eval | predict | convert | chat | data | bench | demo.

Exit codes: 0 success, 2 a user's mistake (one line that names the file / key / sample), 1 an environment failure
(disk full, out of memory, a dead peer: one paragraph saying what is intact) or a bug (a traceback). VLKIT_DEBUG=1 or
``--debug`` shows the traceback of anything.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence

from vlkit import __version__
from vlkit.utils.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    environment_failure,
    environment_message,
    find_user_error,
)

# A path the user named that is missing, unreadable or of the wrong kind (a directory for a file, or the reverse).
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose options may stand anywhere, also after positionals that take several values
    (``vlkit info clip-b16 --json model.vision.num_layers=2``): argparse's intermixed parsing, applied per
    (sub-)command, since argparse refuses it for a parser that has sub-commands."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 (argparse's signature)
        if self._intermixing or any(a.nargs == argparse.PARSER for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.12)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        except TypeError:  # a layout intermixed parsing does not support (argparse.REMAINDER): the plain way
            return super().parse_known_args(args, namespace)
        finally:
            self._intermixing = False


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="resolved config, parameter counts per tower, FLOPs per sample",
        description="Resolve a preset or YAML config (with key=value overrides) and report the model it builds: "
        "the resolved config, parameter counts per tower and FLOPs per sample, traced with "
        "torch.utils.flop_counter on the meta device (no weights are allocated).",
    )
    p.add_argument("config", nargs="?", help="preset name (e.g. clip-b16; see --list) or path to a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.vision.num_layers=6")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-config", action="store_true", help="omit the resolved config from the text output")
    p.add_argument("--list", action="store_true", help="list the presets and public checkpoints (as 'vlkit list')")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from vlkit.info import describe, format_report

    if args.list:  # the config, if given, is a name pattern here
        from vlkit.catalog import print_catalog

        return print_catalog(args.config, args.json)
    if args.config is None:
        from vlkit.config import ConfigError

        raise ConfigError("info needs a preset name or YAML file (vlkit info --list shows the presets)")
    report = describe(args.config, args.overrides)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, show_config=not args.no_config))
    return EXIT_OK


# Sub-commands that live in their own modules. Each module exposes ``register(subparsers)``, which adds its parser(s)
# and sets ``func``.
DATA_COMMANDS = ("vlkit.data.shapes", "vlkit.data.shapes_vqa", "vlkit.data.check", "vlkit.data.write")
# ``bench serve`` lives with the server it measures (serve/ is a front, above bench/).
BENCH_COMMANDS = ("vlkit.bench.loss", "vlkit.bench.fused", "vlkit.bench.train", "vlkit.bench.tokenizer",
                  "vlkit.bench.data", "vlkit.serve.bench")  # fmt: skip


def _register_modules(sub: argparse._SubParsersAction, modules: Sequence[str]) -> None:
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
        else:  # a module with one command: add_arguments + run
            summary = (module.__doc__ or "").replace("``", "").strip().splitlines()[0]  # no docstring markup in help
            p = sub.add_parser(name.rsplit(".", 1)[1], help=summary)
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
    parser = _Parser(
        prog="vlkit",
        description="Pretrain, fine-tune, evaluate and serve vision-language models (CLIP, ViT, NeVA).",
        epilog="Run 'vlkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vlkit {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of any error (also VLKIT_DEBUG=1); may stand anywhere"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    _register_modules(sub, ("vlkit.catalog",))
    _register_modules(sub, ("vlkit.train.cli", "vlkit.eval.cli", "vlkit.predict", "vlkit.interop.cli", "vlkit.chat"))
    _register_modules(sub, ("vlkit.serve.index_cli", "vlkit.serve.cli"))
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
    """Run one command; returns the exit code (see :mod:`vlkit.utils.errors` for the error contract)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug may stand anywhere (like every option); it is the command-line twin of VLKIT_DEBUG=1.
    debug = "--debug" in argv or os.environ.get("VLKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    command = _command_name(args)
    try:
        code = int(args.func(args) or EXIT_OK)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _pipe_closed()
    except Exception as e:
        if debug:
            raise
        user = find_user_error(e) or _user_os_error(e)
        if user is not None:
            print(f"vlkit {command}: error: {_one_line(user)}", file=sys.stderr)
            return EXIT_USAGE
        what = environment_failure(e)
        if what is None:
            raise  # a bug: the traceback is what a bug report needs
        print(environment_message(command, what), file=sys.stderr)
        return EXIT_ERROR


def _command_name(args: argparse.Namespace) -> str:
    """``eval zeroshot``, ``data shapes``, ``train``: the words the user typed, for the message prefix."""
    sub = getattr(args, f"{args.command}_command", None) or getattr(args, f"{args.command}_task", None)
    return f"{args.command} {sub}" if isinstance(sub, str) else str(args.command)


def _user_os_error(e: BaseException) -> BaseException | None:
    """A missing, unreadable or wrong-kind path the user named is their mistake (exit 2), not a bug."""
    if isinstance(e, _USER_OS_ERRORS):  # raised by open() (errno + file name) or by vlkit with a message naming it
        return e
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS and e.filename:
        return e
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())  # one line, whatever the message looked like (YAML errors span several)


def _pipe_closed() -> int:
    """The reader of our output went away (``vlkit ... | head``): stop quietly, as a pipe-closed program does."""
    try:  # later flushes (at interpreter exit) would fail again and print "Exception ignored ..."
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass
    return 128 + getattr(signal, "SIGPIPE", 13)


if __name__ == "__main__":
    sys.exit(main())
