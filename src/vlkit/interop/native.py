"""vlkit's own model directory: ``config.json`` (format marker + model config) and ``model.safetensors``.

Writing is atomic: everything goes to a temporary sibling directory, is fsynced, and replaces the target with a
rename, so a crash mid-save never destroys the previous good copy. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlkit import __version__
from vlkit.models.factory import create_model, model_config_dict

FORMAT = "vlkit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ModelFormatError(ValueError):
    """The path does not hold a model vlkit can load; the message says what was found."""


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without torch.compile's ``_orig_mod.`` prefixes, so compiled and eager models share checkpoints."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one name, record the others as aliases."""
    tensors, aliases, owner = {}, {}, {}
    for name, t in state.items():
        key = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if t.numel()
            else None
        )
        if key is not None and key in owner:
            aliases[name] = owner[key]
            continue
        if key is not None:
            owner[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(target: Path, write: Any) -> None:
    """Call ``write(tmp_dir)``, fsync it, then swap it in for ``target`` (the old copy survives until then)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any directory the user makes
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (built by :func:`vlkit.create_model`) to directory ``path``; returns the path."""
    model = getattr(model, "_orig_mod", model)
    config = {"format": FORMAT, "vlkit_version": __version__, "model": model_config_dict(model), **(extra or {})}
    tensors, aliases = _dedupe(clean_state_dict(model))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})

    atomic_write_dir(Path(path), write)
    return Path(path)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE if path.is_dir() else path
    if not cfg_file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} found (expected a vlkit model directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{cfg_file}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise ModelFormatError(f"{cfg_file}: not a vlkit model config (format={config.get('format')!r})")
    return config


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a vlkit model directory (aliases restored)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{path}: {WEIGHTS_FILE} is missing")
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", strict: bool = True, **overrides: Any
) -> nn.Module:
    """Build the model a vlkit directory describes and load its weights.

    Overrides change the model config before loading, e.g. ``vision__img_h=512, vision__img_w=512`` to fine-tune
    at a higher resolution: position embeddings are resampled to the new grid.
    """
    config = read_config(path)
    model = create_model(config["model"], device=device, **overrides)
    missing, unexpected = model.load_state_dict(load_state_dict(path, device), strict=False)
    if strict and (missing or unexpected):
        raise ModelFormatError(f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model
