"""vlkit's own model directory: ``config.json`` (format marker + model config) and ``model.safetensors``.

Writing is atomic: everything goes to a temporary sibling directory, is fsynced, and replaces the target with a
rename, so a crash mid-save never destroys the previous good copy.

:func:`load_model` also takes Hugging Face CLIP directories and open_clip checkpoints: the format is recognised by
content (the config's fields, a weights file's keys), never by file name. Pickled weights (``.bin``/``.pt``) are
read with ``torch.load(weights_only=True)`` only, so a file that would run code is refused, never executed.

Training outputs load the same way (:func:`resolve_model_source`): a checkpoint directory, single or sharded (a
sharded one is consolidated into full tensors in this process, see :mod:`vlkit.interop.checkpoint_files`), or a run
directory / its ``checkpoints/`` folder, meaning its latest complete checkpoint. :func:`save_full_model` writes a
model directory from any parallel layout; the trainer uses it for ``<output_dir>/model``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlkit.interop.checkpoint_files import (
    CheckpointError,
    find_checkpoint,
    is_checkpoint,
    read_model_state,
    read_tensors,
    read_train_state,
    run_model_config,
)

# The shared helpers live in files.py (so that the format modules need not import this dispatcher); the names
# below stay importable from here too, as tests, docs and callers have long spelt them ``vlkit.interop.native.X``.
from vlkit.interop.files import (  # noqa: F401
    CONFIG_FILE,
    FORMAT,
    OPEN_CLIP_CONFIG_FILE,
    RUN_MODEL_DIR,
    TOKENIZER_FILES_KEY,
    WEIGHTS_FILE,
    ModelFormatError,
    _write_files,
    atomic_write_dir,
    check_before_loading,
    clean_state_dict,
    fit_pos_embed,
    header_shapes,
    load_weights,
    read_json,
    read_weights_file,
    read_weights_keys,
    with_overrides,
    write_model_files,
)
from vlkit.models.factory import create_model, model_config_dict, resolve_model_config
from vlkit.utils.modules import is_sharded, unwrap


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (built by :func:`vlkit.create_model`) to directory ``path``; returns the path."""
    atomic_write_dir(Path(path), lambda tmp: write_model_files(model, tmp, extra))
    return Path(path)


def save_full_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path | None:
    """Write the whole of ``model`` as a vlkit model directory, whatever its layout: plain, DDP, ``torch.compile``d,
    or sharded by FSDP2 / tensor parallel (its DTensors are gathered into full CPU tensors first).

    Collective when ``torch.distributed`` is initialised: every rank calls it (gathering a sharded model is a
    collective); rank 0 writes (atomically, as :func:`save_model`) and returns the path, the others return None.

    Raises:
        TypeError: the model was not built by :func:`vlkit.create_model` (no config to write); raised on every rank,
            before any collective.
    """
    import torch.distributed as dist

    inner = unwrap(model)
    config = model_config_dict(inner)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if is_sharded(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank takes part in the gather; with cpu_offload only rank 0 keeps the full tensors.
        # FSDP x TP parameters gather in two all-gathers, and DTensor logs a warning per parameter saying so (on
        # every rank, at the end of every run): expected here, once per export, so kept out of the user's output.
        redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
        level = redistribute.level
        redistribute.setLevel(logging.ERROR)
        try:
            state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        finally:
            redistribute.setLevel(level)
    else:
        state = inner.state_dict() if rank == 0 else {}
    if rank != 0:
        return None
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    atomic_write_dir(Path(path), lambda tmp: _write_files(config, state, tmp, extra))
    return Path(path)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE if path.is_dir() else path
    if not cfg_file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} found (expected a vlkit model directory)")
    config = read_json(cfg_file)
    if config.get("format") != FORMAT:
        raise ModelFormatError(f"{cfg_file}: not a vlkit model config (format={config.get('format')!r})")
    return config


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a vlkit model directory (aliases restored)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        return read_tensors(weights, device)
    except CheckpointError as e:  # a damaged header: the same one-line message, as the loaders' error class
        raise ModelFormatError(str(e)) from None


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def resolve_model_source(path: str | Path) -> Path:
    """The directory a model path stands for.

    A model or checkpoint directory, or a file, is itself. A run directory (``trainer.output_dir``) or a checkpoints
    folder stands for its latest complete checkpoint, by the rule the trainer resumes with (the ``latest`` pointer
    when it names a complete checkpoint, else the newest complete one); a run directory without one, for the model
    the trainer exported into it (``model/``). Anything else is itself (:func:`detect_format` then says what it is).

    Raises:
        ModelFormatError: the directory holds checkpoints, none of them complete, and no exported model.
    """
    path = Path(path)
    if not path.is_dir() or is_checkpoint(path):
        return path
    if (path / CONFIG_FILE).is_file() or (path / OPEN_CLIP_CONFIG_FILE).is_file():
        return path
    exported = path / RUN_MODEL_DIR
    try:
        found = find_checkpoint(path)
    except CheckpointError as e:
        if (exported / CONFIG_FILE).is_file():
            return exported
        raise ModelFormatError(str(e)) from None
    if found is not None:
        return found
    return exported if (exported / CONFIG_FILE).is_file() else path


def resolve_model_path(path: str) -> str:
    """The directory ``--model PATH`` stands for: a model or checkpoint directory is itself; a run directory or its
    ``checkpoints/`` folder, its latest complete checkpoint (the trainer's rule; see
    :func:`vlkit.interop.native.resolve_model_source`). Left as given when nothing fits, so that loading it says
    what is wrong."""
    try:
        found = resolve_model_source(path)
    except (ModelFormatError, OSError):
        return path
    return path if found == Path(path) else str(found)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """Which kind of model ``path`` holds, judged by content: ``(kind, where)``.

    kind is ``vlkit`` (config.json with ``format: vlkit``), ``checkpoint`` (a trainer checkpoint directory, single
    or sharded; a run directory or a checkpoints folder gives its latest complete one, see
    :func:`resolve_model_source`), ``hf`` (a transformers CLIPModel config.json), ``hf_vision`` (a CLIPVisionModel
    config.json: a vision tower only), ``hf_llama`` (a LlamaForCausalLM config.json), ``llava`` (a
    LlavaForConditionalGeneration config.json) or ``open_clip`` (open_clip_config.json, or a weights file whose
    keys are open_clip's). ``where`` is the directory (or, for a bare checkpoint, the file) to load; a path to a
    directory's config.json means the directory.

    Raises:
        ModelFormatError: anything else; the message names the path and what was found there.
    """
    from vlkit.interop import open_clip
    from vlkit.interop.hf import is_hf_clip_config, is_hf_clip_vision_config, looks_like_hf_clip_state_dict
    from vlkit.interop.hf_llama import is_hf_llama_config
    from vlkit.interop.hf_llava import is_hf_llava_config

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_file() and path.name in (CONFIG_FILE, OPEN_CLIP_CONFIG_FILE):
        return detect_format(path.parent)
    if is_checkpoint(path):
        return "checkpoint", path
    resolved = resolve_model_source(path)
    if resolved != path:
        return detect_format(resolved)
    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        config = read_json(cfg_file) if cfg_file.is_file() else None
        if config is not None:
            if config.get("format") == FORMAT:
                return "vlkit", path
            if is_hf_clip_config(config):
                return "hf", path
            if is_hf_clip_vision_config(config):
                return "hf_vision", path
            if is_hf_llava_config(config):
                return "llava", path
            if is_hf_llama_config(config):
                return "hf_llama", path
        if open_clip.is_open_clip_dir(path):
            return "open_clip", path
        if config is None:
            raise ModelFormatError(
                f"{path}: no {CONFIG_FILE} (vlkit or Hugging Face) and no {OPEN_CLIP_CONFIG_FILE}; {_listing(path)}"
            )
        raise ModelFormatError(
            f"{cfg_file}: not a vlkit model config (format={config.get('format')!r}) nor a Hugging Face CLIP, LLaMA "
            f"or LLaVA config (model_type={config.get('model_type')!r}, architectures={config.get('architectures')!r})"
        )
    keys = read_weights_keys(path)
    if open_clip.looks_like_open_clip_state_dict(keys):
        return "open_clip", path
    if looks_like_hf_clip_state_dict(keys):
        raise ModelFormatError(
            f"{path}: Hugging Face CLIP weights without their config: pass the directory holding them and config.json"
        )
    if any(k.startswith(("visual.patch_embed.", "backbone.patch_embed.")) for k in keys):
        raise ModelFormatError(f"{path}: vlkit weights: pass the model directory (with its {CONFIG_FILE})")
    raise ModelFormatError(f"{path}: a weights file of no known layout; its {len(keys)} keys begin {keys[:4]}")


def _load_vlkit(path: Path, device: str | torch.device, strict: bool, overrides: dict[str, Any]) -> nn.Module:
    config = read_config(path)
    text = config["model"].get("text")
    if config.get(TOKENIZER_FILES_KEY) and isinstance(text, dict):
        from vlkit.data.tokenizer import CLIP_NAMES

        if str(text.get("tokenizer", "clip")).lower() not in CLIP_NAMES:
            # The tokenizer files travel with the directory: point at them wherever it now lives.
            text["tokenizer"] = str(path.resolve())
    weights = path / WEIGHTS_FILE
    if weights.is_file():  # shapes and size against the config before anything is allocated
        check_before_loading(lambda: create_model(config["model"]), header_shapes(weights), path / CONFIG_FILE,
                             config, device=device)  # fmt: skip
    return _from_weights(config["model"], load_state_dict(path, device), path, device, strict, overrides)


def _from_weights(
    model_config: dict, state: dict[str, torch.Tensor], where: Path, device: str | torch.device, strict: bool,
    overrides: dict[str, Any],
) -> nn.Module:  # fmt: skip
    if model_config.get("arch") == "neva" and strict and not overrides:
        from vlkit.interop.neva import neva_from_weights

        # A NeVA trainer checkpoint may hold only what trained (stage 1: the projector); the config names the rest.
        return neva_from_weights(model_config, state, device=device, where=str(where))
    stored_grid = None
    if overrides:
        stored_grid = resolve_model_config(model_config).vision.grid_size
    model = create_model(model_config, device=device, **overrides)
    fit_pos_embed(state, model, stored_grid)
    load_weights(model, state, where, strict)
    return model


def _load_checkpoint(path: Path, device: str | torch.device, strict: bool, overrides: dict[str, Any]) -> nn.Module:
    """A trainer checkpoint as a model: the architecture from its ``config.json`` (or, in checkpoints that lack one,
    the run config in ``train_state.json``), the weights consolidated into full tensors (sharded ones too)."""
    try:
        info = read_train_state(path)
        model_config = read_config(path)["model"] if (path / CONFIG_FILE).is_file() else run_model_config(info)
        if model_config is None:
            raise ModelFormatError(
                f"{path}: the checkpoint names no architecture (no {CONFIG_FILE}, no model config in its train state); "
                "was the model built by vlkit.create_model?"
            )
        partial = bool(info.get("partial_model"))
        if partial and (model_config.get("arch") != "neva" or overrides or not strict):
            raise ModelFormatError(
                f"{path}: holds part of the model only (partial_model: true), which cannot be made into a whole "
                f"model here; load the run's exported model directory ({RUN_MODEL_DIR}/ in trainer.output_dir)"
            )
        state = read_model_state(path, info)
    except CheckpointError as e:
        raise ModelFormatError(str(e)) from None
    try:
        return _from_weights(model_config, state, path, device, strict, overrides)
    except FileNotFoundError as e:
        if not partial:
            raise
        raise ModelFormatError(
            f"{path}: holds part of the model only (NeVA's stage 1 saves what trained), and the rest cannot be read "
            f"from where its config names it: {e}. The run's exported model directory ({RUN_MODEL_DIR}/ in "
            "trainer.output_dir) holds the whole model"
        ) from None


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", strict: bool = True, **overrides: Any
) -> nn.Module:
    """Build the model a directory or checkpoint describes and load its weights; the format is recognised by content.

    Takes a vlkit directory, a Hugging Face ``CLIPModel``, ``LlamaForCausalLM`` or ``LlavaForConditionalGeneration``
    directory (the last gives a NeVA model), or an open_clip directory / checkpoint file (see :func:`detect_format`);
    and what training leaves: a checkpoint directory (single or sharded, consolidated in this process without a
    process group), or a run directory / its ``checkpoints/`` folder for its latest complete checkpoint.
    Overrides change the model config before loading, e.g. ``vision__img_h=512, vision__img_w=512`` to fine-tune at a
    higher resolution: position embeddings are resampled to the new grid.

    Raises:
        ModelFormatError: the path holds none of these, or weights that do not fit their config.
    """
    kind, where = detect_format(path)
    if kind == "vlkit":
        return _load_vlkit(where, device, strict, overrides)
    if kind == "checkpoint":
        return _load_checkpoint(where, device, strict, overrides)
    if kind == "hf":
        from vlkit.interop.hf import load_hf

        return load_hf(where, device=device, **overrides)
    if kind in ("llava", "hf_llama"):
        from vlkit.interop.hf_llama import load_hf_llama
        from vlkit.interop.hf_llava import load_hf_llava

        model = (load_hf_llava if kind == "llava" else load_hf_llama)(where, device=device)
        return with_overrides(model, device, **overrides)
    if kind == "hf_vision":
        raise ModelFormatError(
            f"{where}: a Hugging Face CLIP vision tower only (no text tower); load it with vlkit.load_vision_encoder"
        )
    from vlkit.interop.open_clip import load_open_clip

    model = load_open_clip(where)
    return with_overrides(model, device, **overrides)
