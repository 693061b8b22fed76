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
    read_model_state,
    read_tensors,
    read_train_state,
    run_model_config,
)
from vlkit.interop.detect import detect_format, resolve_model_path, resolve_model_source  # noqa: F401

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
from vlkit.interop.neva import build_neva_model as _build_neva_model
from vlkit.interop.neva import neva_from_weights
from vlkit.interop.vision import VisionEncoder
from vlkit.interop.vision import load_vision_tower as _load_vision_tower
from vlkit.models.factory import create_model, model_config_dict, resolve_model_config
from vlkit.nn.lora import is_adapter_key, merge_lora_state_dict
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
    if any(is_adapter_key(k) for k in state):
        return _merged_from_weights(model_config, state, where, device, strict, overrides)
    if model_config.get("arch") == "neva" and strict and not overrides:
        # A NeVA trainer checkpoint may hold only what trained (stage 1: the projector); the config names the rest.
        return neva_from_weights(model_config, state, load_model, device=device, where=str(where))
    stored_grid = None
    if overrides:
        stored_grid = resolve_model_config(model_config).vision.grid_size
    model = create_model(model_config, device=device, **overrides)
    fit_pos_embed(state, model, stored_grid)
    load_weights(model, state, where, strict)
    return model


def _merged_from_weights(
    model_config: dict, state: dict[str, torch.Tensor], where: Path, device: str | torch.device, strict: bool,
    overrides: dict[str, Any],
) -> nn.Module:  # fmt: skip
    """A LoRA run's checkpoint as the plain model: its base (from the checkpoint, and from where the config names
    what the checkpoint left out) with every adapter merged in, ``W + alpha / rank * B A``; no ``peft`` section."""
    peft = resolve_model_config(model_config).peft
    if peft is None or not peft.lora.rank:
        raise ModelFormatError(f"{where}: LoRA adapters in the weights, but no model.peft.lora in the config")
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    base = {k: v for k, v in state.items() if not is_adapter_key(k)}
    plain = {k: v for k, v in model_config.items() if k != "peft"}
    model = _from_weights(plain, base, where, device, strict, overrides)
    layers = {k[: -len(".lora_A")] for k in adapters if k.endswith(".lora_A")}
    try:
        merged = merge_lora_state_dict({**model.state_dict(), **adapters},
                                       dict.fromkeys(layers, peft.lora.alpha / peft.lora.rank))  # fmt: skip
    except KeyError as e:
        raise ModelFormatError(f"{where}: an adapter without its layer or its pair: {e}") from None
    model.load_state_dict(merged, strict=True)
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
    directory (the last gives a NeVA model), a NeMo GPT / LLaMA ``.nemo`` (file or extracted directory), or an
    open_clip directory / checkpoint file (see :func:`detect_format`);
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
    if kind == "nemo":
        from vlkit.interop.nemo import load_nemo

        return with_overrides(load_nemo(where, device=device), device, **overrides)
    if kind == "hf_vision":
        raise ModelFormatError(
            f"{where}: a Hugging Face CLIP vision tower only (no text tower); load it with vlkit.load_vision_encoder"
        )
    from vlkit.interop.open_clip import load_open_clip

    model = load_open_clip(where)
    return with_overrides(model, device, **overrides)


# -- loaders of pretrained parts, given this dispatcher --------------------------------------------------------------
# A pretrained part (a vision tower, an LLM) may be stored in any format this module reads, so the part loaders in
# vision.py and neva.py take the dispatcher as an argument; these are their public forms.
def load_vision_tower(path: str | Path, *, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """The whole image tower of a pretrained model directory; see :func:`vlkit.interop.vision.load_vision_tower`."""
    return _load_vision_tower(path, load_model, device=device, **overrides)


def load_vision_encoder(
    path: str | Path,
    select_layer: int = -2,
    drop_class_token: bool = True,
    *,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> VisionEncoder:
    """The patch features of one layer of a pretrained image tower, for NeVA's projector.

    Args:
        path: a vlkit directory (CLIP or ViT classifier), a transformers ``CLIPModel`` or ``CLIPVisionModel``
            directory, or an open_clip directory; recognised by content, as :func:`load_model` does.
        select_layer: transformers' ``hidden_states`` index (see :mod:`vlkit.interop.vision`); -2: the penultimate
            block.
        drop_class_token: return the patch tokens only.
        device: where the encoder is built.
        **overrides: vision config overrides relative to ``model``, e.g. ``vision__img_h=336, vision__img_w=336``
            (the position table is resampled).

    Returns:
        A plain, trainable :class:`VisionEncoder` (freeze it yourself); ``.config``, ``.hidden_size``.

    Raises:
        ModelFormatError: the path holds no model with a vision tower.
        ValueError: ``select_layer`` outside the tower's hidden states.
    """
    return VisionEncoder(load_vision_tower(path, device=device, **overrides), select_layer, drop_class_token)


def build_neva_model(cfg: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple:
    """The NeVA of ``cfg`` with the pretrained parts its ``mm_cfg`` names; see
    :func:`vlkit.interop.neva.build_neva_model`."""
    return _build_neva_model(cfg, load_model, device=device, dtype=dtype)
