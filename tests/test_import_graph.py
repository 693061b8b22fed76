"""The package's plan (ARCHITECTURE.md): no import circle, no import pointing up the layers. Read from the code by
tools/import_graph.py, the command the docs give (``python tools/import_graph.py``)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_circle_and_no_upward_import():
    done = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "circles (0)" in done.stdout and "upward imports (0)" in done.stdout


def test_the_tool_finds_a_circle_and_an_upward_import():
    tool = _tool()
    edges = {"vlkit.data.a": {"vlkit.data.b"}, "vlkit.data.b": {"vlkit.data.a"}, "vlkit.models.x": {"vlkit.train.y"}}
    assert [sorted(c) for c in tool.cycles(edges)] == [["vlkit.data.a", "vlkit.data.b"]]
    assert tool.upward(edges) == [("vlkit.models.x", "vlkit.train.y")]


def test_the_tool_reads_an_earlier_revision():
    """``--at REV`` is how the closing note of issue 14 shows the graph before: three circles, two upward imports."""
    done = subprocess.run(
        [sys.executable, str(TOOL), "--at", "42192f9", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TOOL.parents[1],
    )
    if done.returncode == 2 and "git archive" in done.stderr:
        pytest.skip("not a git checkout with its history")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert len(report["circles"]) == 3 and "vlkit.tasks.classify -> vlkit.train.ema" in report["upward"]
