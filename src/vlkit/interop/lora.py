"""LoRA-adapted models as plain ones: the adapters folded into the base weights (``W + alpha / r * B A``).

Used by the trainer's model export (``<output_dir>/model`` of a LoRA run holds merged, plain weights, loadable by
every ``--model``) and by ``vlkit convert --merge-lora SRC --out DIR`` for a LoRA run's checkpoint or model
directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from vlkit.nn.lora import lora_layers, merge_lora_state_dict


def plain_config(config):
    """The model config without its LoRA section (``model.peft``): what the merged model is."""
    if getattr(config, "peft", None) is None:
        return config
    return dataclasses.replace(config, peft=None)


def _full_state(inner: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of every rank's model (collective when sharded; only rank 0's result is complete)."""
    import logging

    from vlkit.utils.modules import is_sharded

    if not is_sharded(inner):
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    redistribute = logging.getLogger("torch.distributed.tensor._redistribute")
    level = redistribute.level
    redistribute.setLevel(logging.ERROR)  # FSDP x TP gathers warn per parameter; expected once per export
    try:
        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        redistribute.setLevel(level)


def plain_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model of ``config`` (its LoRA section dropped) holding ``state`` (already merged), each tensor in its own
    dtype: a bf16 base stays bf16 (not written as fp32, twice the size, after its merge was rounded to bf16)."""
    from vlkit.interop.files import assign_state_dict
    from vlkit.models.factory import create_model

    model = create_model(plain_config(config), device="meta")
    assign_state_dict(model, state, "cpu")
    return model


def save_merged_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path | None:
    """:func:`vlkit.interop.native.save_full_model` with the adapters merged: a plain model directory whose config
    has no ``peft`` section. A model without adapters is saved as it is. Collective when sharded; rank 0 writes and
    returns the path, the others None."""
    import torch.distributed as dist

    from vlkit.interop.native import save_full_model
    from vlkit.utils.modules import unwrap

    inner = unwrap(model)
    scalings = {name.replace("_orig_mod.", ""): layer.scaling for name, layer in lora_layers(inner).items()}
    if not scalings:
        return save_full_model(model, path, extra)
    state = _full_state(inner)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    merged = plain_model(inner.config, merge_lora_state_dict(state, scalings))
    return save_full_model(merged, path, extra)  # plain and unsharded: rank 0 alone, no collective


def load_merged(src: str | Path) -> nn.Module:
    """The plain model of a LoRA run's checkpoint (or run directory, or unmerged model directory): what
    :func:`vlkit.load_model` makes of it -- the base weights from the checkpoint and, for what it left out, from where
    its config names them (``from_pretrained``), every adapter merged in -- after checking that SRC is LoRA's.

    Raises:
        ModelFormatError: SRC is not a vlkit model or checkpoint, has no LoRA section, or does not fit its config.
    """
    from vlkit.interop.checkpoint_files import CheckpointError, read_train_state, run_model_config
    from vlkit.interop.files import ModelFormatError
    from vlkit.interop.native import CONFIG_FILE, detect_format, load_model, read_config
    from vlkit.models.factory import resolve_model_config

    kind, where = detect_format(src)
    if kind not in ("vlkit", "checkpoint"):
        raise ModelFormatError(f"{src}: --merge-lora reads a vlkit run's checkpoint or model directory, not {kind}")
    try:
        has_config = (where / CONFIG_FILE).is_file()
        model_config = read_config(where)["model"] if has_config else run_model_config(read_train_state(where))
    except CheckpointError as e:
        raise ModelFormatError(str(e)) from None
    peft = resolve_model_config(model_config).peft if model_config is not None else None
    if peft is None or not peft.lora.rank:
        raise ModelFormatError(f"{src}: holds no LoRA adapters (model.peft.lora); nothing to merge")
    return load_model(where)
