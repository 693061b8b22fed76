"""docs/config.md must list every key of the schema (it is the reference users read)."""

import dataclasses
import typing
from pathlib import Path

import pytest

from vlkit.config.schema import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def schema_keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        sub = tp if dataclasses.is_dataclass(tp) else (args[0] if len(args) == 1 else None)
        key = f"{prefix}{f.name}"
        if sub is not None and dataclasses.is_dataclass(sub):
            yield from schema_keys(sub, key + ".")
        else:
            yield key


def test_every_key_is_documented():
    if not DOC.is_file():
        pytest.skip("docs/ not present (installed package)")
    text = DOC.read_text()
    missing = [k for k in schema_keys() if f"`{k}`" not in text]
    assert missing == []
