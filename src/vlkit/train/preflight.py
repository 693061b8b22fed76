"""What a training config can be checked for before the model is built or the data read: a wrong path or an
impossible size fails in a second, not after minutes of building.

- data paths: every local ``data.train_path`` / ``data.val_path`` / ``data.image_folder`` must match something:
  a shard pattern (brace range, glob, directory of ``.tar``) at least one shard, a CSV or LLaVA file an existing
  file, an ImageFolder root a directory. Remote sources (``pipe:``, ``s3://``, ``http(s)://``, any ``://``) are
  left to the loader, and so are the synthetic datasets, which are written on first use.
- memory: the parameters, gradients and optimizer state the run needs at least (counted on the meta device)
  against every device's memory together (:mod:`vlkit.utils.memory`); activations come on top, so only a run
  that cannot fit even sharded over all of them is refused.

The resume directory is checked elsewhere (:mod:`vlkit.train.resume_config`), as early.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import braceexpand

from vlkit.config.load import ConfigError

_GLOB_CHARS = set("*?[")
SYNTHETIC_KINDS = ("synthetic_shapes", "synthetic_shapes_vqa")


def preflight(cfg: Any) -> None:
    """Refuse a config whose data paths match nothing or whose model cannot fit the machine (ConfigError /
    TooLargeError, both exit 2), before anything heavy is built."""
    check_data_paths(cfg.data)
    check_training_memory(cfg)


# ------------------------------------------------------------------------------------------------------ data


def _is_remote(spec: str) -> bool:
    # The loader's own rule (vlkit.data.sources.is_remote), without importing the data stack for it.
    return spec.startswith("pipe:") or "://" in spec


def _matches(item: str, shards: bool) -> bool:
    """Whether one brace-expanded item names something: a file, a directory (holding ``.tar`` shards when
    ``shards``), or a glob matching at least one path."""
    path = Path(item).expanduser()
    if _GLOB_CHARS & set(item):
        return bool(glob.glob(str(path)))
    if path.is_dir():
        return not shards or any(path.glob("*.tar"))
    return path.exists()


def _check_pattern(key: str, value: str, shards: bool) -> None:
    """Each ``::``-joined local source of ``value`` must match at least one path."""
    for spec in (s.strip() for s in value.split("::")):
        if not spec or _is_remote(spec):
            continue
        try:
            items = list(braceexpand.braceexpand(spec))
        except Exception as e:  # an unbalanced brace: braceexpand's own message says where
            raise ConfigError(f"{key}={value!r}: not a valid pattern ({e})") from None
        if any(_matches(item, shards) for item in items):
            continue
        first = Path(items[0]).expanduser()
        if shards and first.is_dir():
            raise ConfigError(f"{key}={value!r}: the directory {first} holds no .tar shard")
        source = f"its source {spec!r} " if "::" in value else ""
        count = f" (none of its {len(items)} paths exists)" if len(items) > 1 else ""
        raise ConfigError(f"{key}={value!r}: {source}matches no file{count}{_missing_parent_hint(first)}")


def _missing_parent_hint(path: Path) -> str:
    """`` (no folder /data/cc3m)``: the first missing folder on the way, which is usually the typo."""
    parent = path.parent
    missing = None
    while parent != parent.parent and not parent.exists():
        missing, parent = parent, parent.parent
    return f"; the folder {missing} does not exist" if missing is not None else ""


def _check_file(key: str, value: str, what: str) -> None:
    if _is_remote(value):
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={value!r}: a directory, expected {what}")
    if not path.exists():
        raise ConfigError(f"{key}={value!r}: no such file (expected {what}){_missing_parent_hint(path)}")


def _check_dir(key: str, value: str, what: str) -> None:
    if _is_remote(value):
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value!r}: a file, expected {what}")
    if not path.exists():
        raise ConfigError(f"{key}={value!r}: no such directory (expected {what}){_missing_parent_hint(path)}")


def check_data_paths(data: Any) -> None:
    """Refuse local data paths that match nothing, naming the key and the pattern (ConfigError)."""
    if data.kind in SYNTHETIC_KINDS:
        return  # written at data.train_path on first use
    train = os.fspath(data.train_path) if data.train_path else None
    if data.kind == "webdataset":
        if train:
            _check_pattern("data.train_path", train, shards=True)
    elif data.kind == "csv":
        if train:
            _check_file("data.train_path", train, "a CSV/TSV file with a header row")
    elif data.kind == "imagefolder":
        if train:
            _check_dir("data.train_path", train, "an ImageFolder root (one folder of images per class)")
    elif data.kind == "llava":
        if train:
            _check_file("data.train_path", train, "a LLaVA .json/.jsonl file")
        if data.image_folder:
            _check_dir("data.image_folder", os.fspath(data.image_folder), "the folder the samples' images are in")
    if data.val_path:
        # Evaluation reads several layouts (shards, an ImageFolder, a LLaVA file, a benchmark folder): it is enough
        # here that the path names something.
        _check_pattern("data.val_path", os.fspath(data.val_path), shards=False)


# ------------------------------------------------------------------------------------------------------ memory


def _freeze_as_the_task_will(model: Any, cfg: Any) -> None:
    """Mark what the task leaves untrained, so it is counted without gradients and optimizer state. A whole
    locked tower is frozen even where some of its blocks will train, which keeps the estimate a lower bound."""
    m = cfg.model
    frozen = []
    if m.lock_image and hasattr(model, "visual"):
        frozen.append(model.visual)
    if m.lock_text and hasattr(model, "text"):
        frozen.append(model.text)
    if m.linear_probe and hasattr(model, "backbone"):
        frozen.append(model.backbone)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    # LoRA: the adapted parts' bases frozen and their adapters trainable, by the tasks' own functions (on meta).
    if m.arch == "neva":
        from vlkit.tasks.neva import apply_neva_lora

        apply_neva_lora(model, m)
    elif m.arch == "clip":
        from vlkit.tasks.clip import apply_clip_lora

        apply_clip_lora(model, m)


def check_training_memory(cfg: Any) -> None:
    """Refuse a run whose parameters, gradients and optimizer state cannot fit all its devices together."""
    from vlkit.models import create_model
    from vlkit.utils.memory import TooLargeError, build_on_meta, estimate_training, machine_memory, too_large

    if cfg.model.arch == "neva":  # the parts mm_cfg names bring their own architectures (no weights read here)
        from dataclasses import replace

        from vlkit.interop.neva import pretrained_architecture

        cfg = replace(cfg, model=pretrained_architecture(cfg.model)[0])
    model = build_on_meta(lambda: create_model(cfg), cfg.model, prefix="model")
    _freeze_as_the_task_will(model, cfg)
    precision = str(cfg.trainer.precision).lower()
    precision = "bf16" if "bf16" in precision else "fp16" if "16" in precision else "fp32"
    estimate = estimate_training(model, cfg.model, precision=precision, optimizer=cfg.optim.name, prefix="model")
    accelerator = str(cfg.trainer.accelerator)
    available, machine = machine_memory(accelerator)
    if os.environ.get("WORLD_SIZE") is None and cfg.trainer.num_nodes > 1:
        available, machine = available * cfg.trainer.num_nodes, f"{machine} (x {cfg.trainer.num_nodes} nodes)"
    problem = too_large(estimate, available, machine)
    if problem is not None:
        raise TooLargeError(
            f"{problem}. Train on more or larger devices (FSDP shards this state over them: "
            "parallel.data_parallel=fsdp), freeze a tower (model.lock_image=true) or pick a smaller preset"
        )
