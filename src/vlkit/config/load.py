"""Loading a config: preset or YAML file, then ``key=value`` overrides, then validation — before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlkit.config import compat
from vlkit.config.schema import Config, MMConfig
from vlkit.config.validate import validate
from vlkit.utils.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used: unknown key, wrong type, invalid combination. The CLI exits with code 2."""


PRESET_PACKAGE = "vlkit.config.presets"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str | Path) -> tuple[dict, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config: give a preset name (see --list) or a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text, where = path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text at byte {e.start})") from None
    else:
        preset = resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
        if not preset.is_file():
            close = difflib.get_close_matches(str(name_or_path), list_presets(), n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown preset or config file {name_or_path!r}{hint}; presets: {', '.join(list_presets())}"
            )
        text, where = preset.read_text(), f"preset {name_or_path}"
    try:
        tree = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except yaml.YAMLError as e:  # the parser names "<unicode string>": name the file and the line instead
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree, where


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` from a YAML error (1-based, as editors count), without the parser's
    ``"<unicode string>"`` locations."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp


def check_key(path: str) -> str | None:
    """None if ``path`` names a field of the schema (or lies under a free-form dict field), else an error message."""
    cls: Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "<top level>"
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" ({where} has: {', '.join(names)})"
            return f"unknown key {path}{hint}"
        tp = _field_type(cls, part)
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        return None  # a leaf, or a free-form dict/list field: anything below is the field's value
    return None


def _translate(tree: dict, arch: str, where: str) -> tuple[dict, list[str]]:
    """Move compatibility keys to their vlkit names; collect unknown-key errors instead of failing on the first."""
    out = OmegaConf.create({})
    errors = []
    for path, value in compat.flatten(tree):
        if not path:
            continue
        err = compat.check_fixed(path, value)
        if err:
            errors.append(f"{where}: {err}")
            continue
        new = compat.translate_path(path, arch)
        if new is None:
            continue
        err = check_key(new)
        if err:
            errors.append(f"{where}: {err}" if new == path else f"{where}: {err} (from {path})")
            continue
        OmegaConf.update(out, new, value, merge=True, force_add=True)
    return OmegaConf.to_container(out, resolve=False), errors


def _parse_overrides(overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return _nest(overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None


def _nest(flat: dict) -> dict:
    out = OmegaConf.create({})
    for k, v in flat.items():
        OmegaConf.update(out, str(k), v, merge=True, force_add=True)
    return OmegaConf.to_container(out, resolve=False)


def _load_tree(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> tuple[DictConfig, list[str]]:
    """A preset may start from another one with ``base: NAME``; the chain is merged oldest first."""
    tree, where = _read_yaml(name_or_path)
    base_name = tree.pop("base", None)
    if base_name is not None:
        if str(base_name) in seen:
            raise ConfigError(f"{where}: base presets form a cycle: {' -> '.join((*seen, str(base_name)))}")
        cfg, errors = _load_tree(base_name, (*seen, str(name_or_path)))
    else:
        cfg, errors = OmegaConf.structured(Config), []
    arch = (
        str(tree.get("model", {}).get("arch", cfg.model.arch))
        if isinstance(tree.get("model"), dict)
        else cfg.model.arch
    )
    translated, errs = _translate(tree, arch, where)
    if errs and base_name is None:
        hint = _missing_arch_hint(tree, where, len(errs))
        if hint:  # one line that says what is missing, instead of one unknown key per line of the block
            raise ConfigError(hint)
    errors += errs
    cfg = _merge(cfg, translated, where, errors)
    return cfg, errors


# Architectures whose document blocks are often pasted without the vlkit wrapping (``model:`` and ``arch:``).
_DOC_ARCHES = ("vit_classifier", "clip", "neva")


def _missing_arch_hint(tree: dict, where: str, n_errors: int) -> str | None:
    """A hint when a document's model block was pasted flat or without ``arch:``: the same keys would all be valid
    under ``model:`` with one architecture (the ViT document's block without ``model.arch: vit_classifier``)."""
    model = tree.get("model")
    if isinstance(model, dict) and "arch" in model:
        return None
    # The top-level keys that are not sections: the pasted block (a flat paste) or the whole model section.
    sections = {f.name for f in dataclasses.fields(Config)}
    flat = {k: v for k, v in tree.items() if k not in sections}
    block = {**(model if isinstance(model, dict) else {}), **flat}
    if not block:
        return None
    for arch in _DOC_ARCHES:
        _, errs = _translate({"model": {**block, "arch": arch}}, arch, where)
        if not errs:
            todo = f"nest the block under model: and add arch: {arch}" if flat else f"add arch: {arch} under model:"
            return (
                f"{where}: {n_errors} keys are unknown, but all are valid model keys with model.arch: {arch}; "
                f"{todo} (or start from a preset with base: "
                f"{'vit-b16' if arch == 'vit_classifier' else 'clip-b16' if arch == 'clip' else 'neva-tiny'})"
            )
    return None


def _merge(cfg: DictConfig, tree: dict, where: str, errors: list[str]) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, tree)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        errors.append(f"{where}: invalid value for {key}: {msg}")
        return cfg


def load_config(name_or_path: str | Path, overrides: list[str] | dict | None = None) -> Config:
    """Load a preset name or YAML path, apply ``key=value`` overrides, resolve ``${...}`` and validate.

    Returns the typed :class:`~vlkit.config.schema.Config`. Raises :class:`ConfigError` naming every bad key.
    """
    cfg, errors = _load_tree(name_or_path)
    return apply_overrides(cfg, overrides, errors)


def apply_overrides(
    cfg: Config | DictConfig, overrides: list[str] | dict | None, errors: list[str] | None = None
) -> Config:
    """Merge ``key=value`` strings or a {dotted key: value} dict into a config, then finalize it.

    ``errors`` carries problems already found (for example in the preset) so that all are reported together.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    errors = list(errors or [])
    translated, errs = _translate(_parse_overrides(overrides), cfg.model.arch, "override")
    errors += errs
    cfg = _merge(cfg, translated, "override", errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return finalize(cfg)


def finalize(cfg: DictConfig | Config) -> Config:
    """Resolve interpolations, normalise accepted aliases, fill derived fields and validate."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    try:
        OmegaConf.resolve(cfg)
        obj: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"cannot resolve {key}: {str(e).splitlines()[0]}") from None
    compat.normalize_values(obj)
    _derive(obj)
    problems = validate(obj)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return obj


def _derive(cfg: Config) -> None:
    m = cfg.model
    if m.arch == "neva" and m.mm_cfg is None:
        m.mm_cfg = MMConfig()  # NeMo's defaults: frozen vision tower read at layer -2, linear projector
    towers = [m.vision, m.text] if m.arch == "clip" else [m.vision]
    for tower in towers:
        if tower is not None and tower.output_dim is None and m.arch == "clip":
            tower.output_dim = m.output_dim
    if m.text is not None and m.text.max_position_embeddings is None:
        m.text.max_position_embeddings = m.text.encoder_seq_length


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
