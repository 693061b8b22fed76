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

from vlkit.nn.lora import is_adapter_key, lora_layers, merge_lora_state_dict


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
    """The model of ``config`` (its LoRA section dropped) holding ``state`` (already merged)."""
    from vlkit.models.factory import create_model

    model = create_model(plain_config(config), device="meta").to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
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
    """The plain model of a LoRA run's checkpoint (or run directory, or unmerged model directory): the base weights
    from the checkpoint and, for what it left out, from where its config names them (``from_pretrained``), then
    every adapter merged in.

    Raises:
        ModelFormatError: SRC is not a vlkit model or checkpoint, holds no adapters, or does not fit its config.
    """
    from vlkit.interop.checkpoint_files import CheckpointError, read_model_state, read_train_state, run_model_config
    from vlkit.interop.files import ModelFormatError
    from vlkit.interop.native import CONFIG_FILE, detect_format, load_model, load_state_dict, read_config
    from vlkit.models.factory import create_model, resolve_model_config

    kind, where = detect_format(src)
    try:
        if kind == "vlkit":
            model_config, state = read_config(where)["model"], load_state_dict(where)
        elif kind == "checkpoint":
            info = read_train_state(where)
            has_config = (where / CONFIG_FILE).is_file()
            model_config = read_config(where)["model"] if has_config else run_model_config(info)
            state = read_model_state(where, info)
        else:
            raise ModelFormatError(f"{src}: --merge-lora reads a vlkit run's checkpoint or model directory, not {kind}")
    except CheckpointError as e:
        raise ModelFormatError(str(e)) from None
    if model_config is None:
        raise ModelFormatError(f"{src}: the checkpoint names no architecture")
    cfg = resolve_model_config(model_config)
    lora = cfg.peft.lora if cfg.peft is not None else None
    if not any(is_adapter_key(k) for k in state) or lora is None or not lora.rank:
        raise ModelFormatError(f"{src}: holds no LoRA adapters (model.peft.lora); nothing to merge")
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    base = {k: v for k, v in state.items() if not is_adapter_key(k)}
    plain = plain_config(cfg)
    if plain.arch == "neva":
        from vlkit.interop.neva import neva_from_weights

        model = neva_from_weights(plain, base, load_model, where=str(where))
    else:
        model = create_model(plain)
        model.load_state_dict(base, strict=True)
    full = model.state_dict()
    missing = sorted({k[: -len(".lora_A")] for k in adapters if k.endswith(".lora_A")} - {
        k[: -len(".weight")] for k in full if k.endswith(".weight")})  # fmt: skip
    if missing:
        raise ModelFormatError(f"{src}: adapters of layers the model does not have: {missing[:6]}")
    scaling = lora.alpha / lora.rank
    layers = {k[: -len(".lora_A")] for k in adapters if k.endswith(".lora_A")}
    merged = merge_lora_state_dict({**full, **adapters}, dict.fromkeys(layers, scaling))
    model.load_state_dict(merged, strict=True)
    return model
