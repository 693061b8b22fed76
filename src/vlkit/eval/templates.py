"""Class names and prompt templates for zero-shot classification.

Built-in sets (``--templates NAME``):

- ``openai``: OpenAI's 80 ImageNet prompts ("a bad photo of a {}.", ...), the ensemble CLIP's paper reports;
- ``openai7``: the 7 of them OpenAI's notebook found to do as well as all 80 ("itap of a {}.", ...; open_clip's
  ``SIMPLE_IMAGENET_TEMPLATES``);
- ``simple``: the single prompt ``"a photo of a {}."``.

A template marks the class name with ``{}`` (OpenAI's notebook) or ``{c}`` (CLIP_benchmark's files); the name is
substituted literally, so names containing braces are safe. ImageNet's 1000 class names are OpenAI's curated ones
(``--classes imagenet``). Provenance and licence: ``vlkit/eval/data/NOTICE.txt``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

SIMPLE_TEMPLATES = ("a photo of a {}.",)
BUILTIN_TEMPLATES = ("openai", "openai7", "simple")
BUILTIN_CLASSES = ("imagenet",)
_PLACEHOLDERS = ("{}", "{c}")


@functools.cache
def _imagenet() -> dict:
    text = resources.files("vlkit.eval").joinpath("data/imagenet.json").read_text(encoding="utf-8")
    return json.loads(text)


def imagenet_classnames() -> list[str]:
    """OpenAI's 1000 ImageNet class names, in the standard (sorted WordNet id) class order."""
    return list(_imagenet()["classes"])


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, ``{}`` marking the class name."""
    return list(_imagenet()["templates"])


def builtin_templates(name: str) -> list[str]:
    """A built-in template set: ``openai`` (80), ``openai7`` (7) or ``simple`` (1)."""
    if name == "openai":
        return openai_imagenet_templates()
    if name == "openai7":
        return list(_imagenet()["templates_openai7"])
    if name == "simple":
        return list(SIMPLE_TEMPLATES)
    raise ValueError(f"unknown template set {name!r}; choose from {', '.join(BUILTIN_TEMPLATES)} or give a file")


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class: the template with its ``{}`` (or ``{c}``) replaced by ``classname``."""
    for mark in _PLACEHOLDERS:
        if mark in template:
            return template.replace(mark, classname)
    raise ValueError(f"template {template!r} has no {{}} or {{c}} placeholder for the class name")


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list, after checking there is at least one and each has a placeholder."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: no templates")
    for t in templates:
        if not isinstance(t, str) or not any(mark in t for mark in _PLACEHOLDERS):
            raise ValueError(f"{where}: template {t!r} has no {{}} or {{c}} placeholder for the class name")
    return templates


def read_text_list(path: str | os.PathLike, key: str) -> list[str]:
    """Strings from a file: a JSON list, a JSON object's ``key`` list, or a text file with one entry per line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no list of strings under ``key``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        values = data.get(key) if isinstance(data, dict) else data
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}: expected a JSON list of strings or an object with a {key!r} list of strings")
        return values
    return [line.strip() for line in text.splitlines() if line.strip()]


def classes_file_templates(path: str | os.PathLike | None) -> list[str] | None:
    """The ``templates`` list of a ``classes.json`` (what ``vlkit data shapes`` writes), or None when it has none."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    templates = data.get("templates") if isinstance(data, dict) else None
    return list(templates) if isinstance(templates, list) and templates else None


def resolve_templates(
    spec: str | os.PathLike | Sequence[str] | None, classes_file: str | os.PathLike | None = None
) -> tuple[list[str], str]:
    """The templates to use and a short name for reports.

    Args:
        spec: a built-in name (``openai``, ``openai7``, ``simple``), a file (see :func:`read_text_list`; a
            ``classes.json`` works, its ``templates`` are read), a list of templates, or None: the ``templates`` of
            ``classes_file`` when it has some, else ``openai``.
        classes_file: the dataset's ``classes.json``, consulted when ``spec`` is None.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_text_list` and :func:`check_templates`.
    """
    if spec is None:
        found = classes_file_templates(classes_file)
        if found is not None:
            return check_templates(found, str(classes_file)), f"{classes_file}"
        return builtin_templates("openai"), "openai"
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in BUILTIN_TEMPLATES:
            return builtin_templates(name), name
        return check_templates(read_text_list(name, "templates"), name), name
    return check_templates(spec), "custom"


def resolve_classnames(spec: str | os.PathLike | Sequence[str]) -> tuple[list[str], str]:
    """Class names from a built-in name (``imagenet``), a file (``classes.json``, JSON list, or .txt), or a list."""
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in BUILTIN_CLASSES:
            return imagenet_classnames(), name
        names = read_text_list(name, "classes")
        if not names:
            raise ValueError(f"{name}: no class names")
        return names, name
    names = list(spec)
    if not names:
        raise ValueError("no class names")
    return names, "custom"
