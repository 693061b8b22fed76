"""The command blocks of README.md and docs/*.md cannot drift from the code: every ``vlkit`` line in a ```bash / ```sh
block parses with the real parser (a renamed option fails here), every preset it names exists, and the ones that
run in a second on the CPU are run."""

import re
import shlex
from pathlib import Path

import pytest

from vlkit.cli import build_parser, main
from vlkit.config import list_presets

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(?:bash|sh)\n(.*?)^```", re.S | re.M)
# Commands whose first argument is a config (preset name or YAML path).
CONFIG_COMMANDS = {"train", "info"}
# Run for real: cheap, offline, no data or GPU. The rest need real datasets, downloads, a GPU or minutes of CPU.
RUN = {
    "vlkit list": 0,
    "vlkit info clip-l14": 0,
    "vlkit info clip-b16 model.vision.hiden_size=3": 2,
}


def doc_commands() -> list[tuple[str, int, list[str]]]:
    """(file, line, argv after 'vlkit') for every vlkit invocation in a shell block (torchrun / srun / python -m
    vlkit included), continuation lines joined and comments dropped."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in BLOCK.finditer(text):
            first_line = text[: block.start(1)].count("\n") + 1
            lines = block.group(1).replace("\\\n", " \\\n").splitlines()
            logical, start = "", None
            for i, line in enumerate(lines):
                start = first_line + i if start is None else start
                if line.rstrip().endswith("\\"):
                    logical += line.rstrip()[:-1] + " "
                    continue
                logical += line
                for words in simple_commands(logical):
                    argv = vlkit_argv(words)
                    if argv is not None:
                        found.append((doc.name, start, argv))
                logical, start = "", None
    return found


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command of a shell line, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for word in lexer:
        if word and set(word) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in [*commands, current] if c]


def vlkit_argv(words: list[str]) -> list[str] | None:
    """The arguments of ``vlkit ...`` or of ``... -m vlkit ...`` (torchrun, srun python); None for other commands."""
    if words[0] == "vlkit":
        return words[1:]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "vlkit":
            return words[i + 2 :]
    return None


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 40
    assert {"README.md", "interop.md", "evaluation.md", "training.md"} <= {f for f, _, _ in COMMANDS}


@pytest.mark.parametrize("where,argv", [(f"{f}:{n}", argv) for f, n, argv in COMMANDS], ids=lambda v: str(v)[:60])
def test_every_documented_command_parses(where, argv):
    parser = build_parser(argv)
    if any(a.startswith("[") for a in argv):  # a synopsis (``[--prompt TEXT]``): its options must exist
        sub = command_parser(parser, argv)
        known = {o for action in sub._actions for o in action.option_strings}
        named = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(argv)))
        assert named <= known, f"{where}: vlkit {' '.join(argv)}: no option {', '.join(sorted(named - known))}"
        return
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on an unknown option / command, 0 for --help
        assert e.code == 0, f"{where}: vlkit {' '.join(argv)} does not parse"
        return
    if args.command in CONFIG_COMMANDS and getattr(args, "config", None):
        config = args.config
        if not config.endswith((".yaml", ".yml")) and "/" not in config:
            assert config in list_presets(), f"{where}: no preset {config!r}"


def command_parser(parser, argv: list[str]):
    """The (sub-)parser that the leading command words of ``argv`` select."""
    import argparse

    for word in argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
    return parser


@pytest.mark.parametrize("line,code", RUN.items())
def test_cheap_documented_commands_run(line, code, capsys):
    argv = shlex.split(line)[1:]
    assert any(a == argv for _, _, a in COMMANDS), f"{line!r} is no longer in the docs: update RUN"
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 2:
        assert "model.vision.hiden_size" in captured.err and "hidden_size" in captured.err
