"""The import graph of the vlkit package, read from the code: circles, imports that point up the layers of
ARCHITECTURE.md, and the largest files. ``python tools/import_graph.py [--json] [--at REV]``; exit 1 when there is a
circle or an upward import. ``--at REV`` reads the package as it was at a git revision (``--at 42192f9``: before
issue 14), with today's layer map.

Every ``import vlkit.x`` / ``from vlkit.x import y`` counts, at module level or inside a function (a deferred import is
still a dependency), except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Lower number = lower layer. A module may import its own layer's modules and lower layers'.
LAYERS = {
    "utils": 0, "config": 0,
    "nn": 1,
    "models": 2,
    "data": 3, "losses": 3, "parallel": 3,
    "interop": 4,
    "eval": 5,
    "tasks": 6,
    "train": 7,
    "bench": 8,
    "cli": 9, "demo": 9, "chat": 9, "predict": 9, "serve": 9, "catalog": 9, "info": 9, "__main__": 9,
}  # fmt: skip
# The package root (vlkit/__init__.py: the public Python API) re-exports from every layer.
TOP = "vlkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlkit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("vlkit"):
                found.add(target)
                # `from vlkit.data import shards` imports the submodule vlkit.data.shards
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    files = {module_name(p): p for p in SRC.joinpath("vlkit").rglob("*.py")}
    edges = {}
    for name, path in files.items():
        edges[name] = {t for t in imports_of(path, name) if t in files and t != name}
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in files.items()}
    return edges, sizes


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for src, targets in edges.items():
        low = layer(src)
        if low is None:
            continue
        for t in targets:
            high = layer(t)
            if high is not None and high > low:
                out.append((src, t))
    return sorted(out)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package roots left out: importing
    ``vlkit.data.x`` runs ``vlkit/data/__init__.py``, which is not a dependency of x on its siblings."""
    nodes = {n: {t for t in ts if t in edges and "." in t and not _is_package(t)} for n, ts in edges.items()}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in nodes.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(comps)


def _is_package(name: str) -> bool:
    return SRC.joinpath(*name.split("."), "__init__.py").is_file()


def _checkout_src(rev: str, into: Path) -> Path:
    """The revision's ``src/`` unpacked under ``into`` (git archive: no work tree touched)."""
    repo = SRC.parent
    done = subprocess.run(["git", "-C", str(repo), "archive", rev, "src"], capture_output=True)
    if done.returncode != 0:
        raise ValueError(f"git archive {rev}: {done.stderr.decode().strip()}")
    archive = done.stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="vlkit's import graph: circles, upward imports, largest files")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--at", metavar="REV", help="read the package at this git revision instead of the work tree")
    args = parser.parse_args(argv)
    global SRC
    if args.at:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                here, SRC = SRC, _checkout_src(args.at, Path(tmp))
            except ValueError as e:
                parser.error(str(e))
            try:
                return _report(args.json)
            finally:
                SRC = here
    return _report(args.json)


def _report(as_json: bool) -> int:
    edges, sizes = graph()
    report = {
        "modules": len(edges),
        "circles": cycles(edges),
        "upward": [f"{a} -> {b}" for a, b in upward(edges)],
        "largest": [f"{n} ({s} lines)" for n, s in sorted(sizes.items(), key=lambda x: -x[1])[:8]],
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['modules']} modules")
        print(f"circles ({len(report['circles'])}):")
        for c in report["circles"]:
            print("  " + " <-> ".join(c))
        print(f"upward imports ({len(report['upward'])}):")
        for u in report["upward"]:
            print("  " + u)
        print("largest files:")
        for f in report["largest"]:
            print("  " + f)
    return 1 if report["circles"] or report["upward"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
