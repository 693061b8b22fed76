"""Hugging Face ``transformers`` CLIP <-> vlkit, without importing transformers.

A transformers ``CLIPModel`` directory is ``config.json`` (``model_type: clip``, a ``text_config`` and a
``vision_config``) + weights (``model.safetensors``, safetensors shards with ``model.safetensors.index.json``, or
``pytorch_model.bin``, read with ``torch.load(weights_only=True)``), usually with ``preprocessor_config.json`` and the
tokenizer (``vocab.json`` + ``merges.txt``, ``tokenizer.json``). Both models are the same network; what differs:

* attention: Hugging Face keeps q/k/v as three Linear layers; vlkit fuses them, laid out per head as
  ``[q_h; k_h; v_h]`` (see :class:`vlkit.nn.Attention`), so converting interleaves rows (:func:`fuse_qkv`);
* text pooling: transformers pools at the first ``eos_token_id``, except for configs written before its fix (which
  say ``eos_token_id: 2``) where it pools at ``argmax(input_ids)``: the end-of-text token, because CLIP's is the
  largest id. vlkit's ``model.text.eot_token_id`` is set to the token that rule finds;
* logit scale: transformers does not clamp it, vlkit clamps at ``logit_scale_max``; OpenAI's stored value (4.6052)
  lies just above ln 100, so the converted config raises ``logit_scale_max`` to the stored value;
* preprocessing: ``CLIPImageProcessor`` crops at ``(size - crop) // 2`` (``crop_style: hf``), and its mean, std and
  resampling filter are carried into ``model.vision``;
* image shape: a transformers CLIP vision tower is square (one ``image_size``); vlkit's may be non-square, which
  cannot be exported. A square model still runs on non-square images in both (transformers with
  ``interpolate_pos_encoding=True``, vlkit always), with the same bicubic resampling of the position table.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlkit.config.schema import ModelConfig, VisionConfig
from vlkit.interop.files import (
    CONFIG_FILE,
    ModelFormatError,
    atomic_write_dir,
    check_before_loading,
    clean_state_dict,
    declared_tensors,
    read_json,
    read_weights_file,
    save_converted,
)
from vlkit.models.clip import CLIPModel
from vlkit.models.factory import resolve_model_config
from vlkit.nn.attention import fuse_qkv, unfuse_qkv

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers' names for the two special tokens of CLIP's vocabulary (open_clip and vlkit's asset say <start_of_text>).
HF_BOS, HF_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408

# transformers' defaults for the keys a config.json may leave out (CLIPTextConfig, CLIPVisionConfig, CLIPConfig).
_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0, "eos_token_id": 49407,
}  # fmt: skip
_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
}  # fmt: skip
_CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
# Configs written before transformers fixed CLIP's eos carry eos_token_id 2; it then pools at argmax(input_ids).
_LEGACY_EOS = 2

# hidden_act -> model.*.activation. gelu_new is the tanh approximation written out (equal to ~1e-7).
_FROM_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "relu": "relu"}  # fmt: skip
_TO_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
# PIL resampling filters as CLIPImageProcessor stores them.
_FROM_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_TO_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}


# -- recognising the format ------------------------------------------------------------------------------------------


def _architectures(config: dict) -> list[str]:
    archs = config.get("architectures") or []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def is_hf_clip_config(config: dict) -> bool:
    """A transformers CLIPModel config.json (``model_type: clip``, or a ``CLIPModel`` architecture)."""
    return config.get("model_type") == "clip" or "CLIPModel" in _architectures(config)


def is_hf_clip_vision_config(config: dict) -> bool:
    """A transformers CLIPVisionModel (or ...WithProjection) config.json: a vision tower only."""
    return config.get("model_type") == "clip_vision_model" or any(
        a.startswith("CLIPVisionModel") for a in _architectures(config)
    )


def looks_like_hf_clip_state_dict(keys: list[str]) -> bool:
    return any(k.endswith("embeddings.patch_embedding.weight") for k in keys) and any(
        "encoder.layers.0.self_attn.q_proj" in k for k in keys
    )


def _tower_config(config: dict, name: str, defaults: dict) -> dict:
    """A tower's settings: transformers' defaults, then ``<name>``, then the older ``<name>_dict`` (which wins)."""
    out = dict(defaults)
    for key in (name, f"{name}_dict"):
        section = config.get(key)
        if isinstance(section, dict):
            out.update({k: v for k, v in section.items() if v is not None})
    return out


def read_hf_config(path: Path) -> dict:
    """config.json of a transformers CLIP directory, checked to be one."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} (expected a Hugging Face CLIPModel directory)")
    config = read_json(file)
    if not (is_hf_clip_config(config) or is_hf_clip_vision_config(config)):
        raise ModelFormatError(
            f"{file}: not a Hugging Face CLIP config (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r})"
        )
    return config


# -- configs ---------------------------------------------------------------------------------------------------------


def _activation(hf_act: Any, where: str) -> str:
    if hf_act not in _FROM_HF_ACT:
        raise ModelFormatError(f"{where}.hidden_act={hf_act!r}: vlkit supports {', '.join(_FROM_HF_ACT)}")
    return _FROM_HF_ACT[hf_act]


def _pair(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ModelFormatError(f"{where}={value!r}: expected an integer or [height, width]")


def _side(value: Any, key: str) -> tuple[int, int] | None:
    """(height, width) of a CLIPImageProcessor size entry: an int, {height, width} or {shortest_edge}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if key in value:
            return int(value[key]), int(value[key])
    return None


def _tower_common(t: dict, where: str) -> dict:
    return {
        "num_layers": int(t["num_hidden_layers"]),
        "hidden_size": int(t["hidden_size"]),
        "ffn_hidden_size": int(t["intermediate_size"]),
        "num_attention_heads": int(t["num_attention_heads"]),
        "activation": _activation(t["hidden_act"], where),
        "layernorm_epsilon": float(t["layer_norm_eps"]),
        "attention_dropout": float(t["attention_dropout"]),
    }


def _vision_section(v: dict, where: str) -> dict:
    img_h, img_w = _pair(v["image_size"], f"{where}.image_size")
    patch_h, patch_w = _pair(v["patch_size"], f"{where}.patch_size")
    if patch_h != patch_w:
        raise ModelFormatError(f"{where}.patch_size={v['patch_size']!r}: vlkit needs square patches")
    return {
        **_tower_common(v, where),
        "patch_dim": patch_h,
        "img_h": img_h,
        "img_w": img_w,
        "num_channels": int(v["num_channels"]),
        "class_token_length": 1,
        "pre_norm": True,  # CLIP's pre_layrnorm
        "patch_bias": False,
        "crop_style": "hf",  # CLIPImageProcessor's crop offset
    }


def _eot_token_id(t: dict, where: str) -> int:
    eos = t["eos_token_id"]
    if isinstance(eos, list):
        raise ModelFormatError(f"{where}.eos_token_id={eos!r}: CLIP pools at one end-of-text token, not a list")
    if eos == _LEGACY_EOS:
        # transformers then pools at argmax(input_ids): CLIP's end-of-text is the last id of the vocabulary.
        return int(t["vocab_size"]) - 1
    return int(eos)


def _text_section(t: dict, where: str) -> dict:
    return {
        **_tower_common(t, where),
        "encoder_seq_length": int(t["max_position_embeddings"]),
        "vocab_size": int(t["vocab_size"]),
        "eot_token_id": _eot_token_id(t, where),
        "pooling": "eot",
        "causal": True,
    }


def _preprocessing(pre: dict | None, vision: dict, file: Path) -> dict:
    """model.vision preprocessing keys from a CLIPImageProcessor config (none without the file)."""
    if pre is None:
        return {}
    out: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if isinstance(pre.get(key), list):
            out[key] = [float(x) for x in pre[key]]
    resample = pre.get("resample", 3)
    if resample in _FROM_PIL_RESAMPLE:
        out["resize_interpolation"] = _FROM_PIL_RESAMPLE[resample]
    else:
        warnings.warn(f"{file}: resample={resample!r} has no vlkit equivalent; vlkit resizes bicubic", stacklevel=3)
    model_size = (vision["img_h"], vision["img_w"])
    crop = _side(pre.get("crop_size"), "shortest_edge") if pre.get("do_center_crop", True) else None
    size = _side(pre.get("size"), "shortest_edge") if pre.get("do_resize", True) else None
    # vlkit's eval transform resizes the shorter side to the model's size and centre-crops it; say so when the
    # processor did something else (a crop smaller than the resize, no crop, another crop size).
    if crop is not None and crop != model_size:
        warnings.warn(f"{file}: crop_size {crop} differs from the model's image size {model_size}", stacklevel=3)
    if size is not None and crop is not None and min(size) != min(crop):
        warnings.warn(
            f"{file}: resizes to {size} before a {crop} crop; vlkit's eval transform resizes to the crop size",
            stacklevel=3,
        )
    return out


def hf_model_config(config: dict, preprocessor: dict | None = None, where: str | Path = CONFIG_FILE) -> dict:
    """The vlkit model config (a plain dict for :func:`vlkit.create_model`) of a transformers CLIPModel config."""
    text = _tower_config(config, "text_config", _TEXT_DEFAULTS)
    vision = _vision_section(_tower_config(config, "vision_config", _VISION_DEFAULTS), f"{where}: vision_config")
    vision.update(_preprocessing(preprocessor, vision, Path(where).with_name(PREPROCESSOR_FILE)))
    top = {**_CLIP_DEFAULTS, **{k: v for k, v in config.items() if k in _CLIP_DEFAULTS and v is not None}}
    return {
        "arch": "clip",
        "output_dim": int(top["projection_dim"]),
        "logit_scale_init": float(top["logit_scale_init_value"]),
        "vision": vision,
        "text": _text_section(text, f"{where}: text_config"),
    }


def hf_vision_section(config: dict, preprocessor: dict | None = None, where: str | Path = CONFIG_FILE) -> dict:
    """``model.vision`` (a plain dict, no projection) of a transformers CLIPModel or CLIPVisionModel config."""
    if is_hf_clip_config(config):
        section = _tower_config(config, "vision_config", _VISION_DEFAULTS)
    else:  # a vision model's config.json holds the tower's settings at the top level
        section = {**_VISION_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    vision = _vision_section(section, f"{where}")
    vision.update(_preprocessing(preprocessor, vision, Path(where).with_name(PREPROCESSOR_FILE)))
    return vision


def _require(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _check_exportable(cfg: ModelConfig) -> None:
    """Every reason a vlkit model has no transformers CLIPModel equivalent, at once."""
    p: list[str] = []
    _require(p, cfg.arch == "clip", f"model.arch={cfg.arch!r} (only clip models export)")
    v, t = cfg.vision, cfg.text
    _require(p, v.img_h == v.img_w, f"model.vision.img_h={v.img_h} != img_w={v.img_w} (transformers CLIP is square)")
    _require(p, v.class_token_length == 1, "model.vision.class_token_length must be 1")
    _require(p, not v.global_average_pool, "model.vision.global_average_pool must be false")
    _require(p, v.pre_norm, "model.vision.pre_norm must be true (transformers has pre_layrnorm)")
    _require(p, not v.patch_bias, "model.vision.patch_bias must be false")
    _require(p, v.output_dim is not None, "model.vision.output_dim must be set (a projection)")
    if t is not None:
        _require(p, t.pooling == "eot", "model.text.pooling must be eot")
        _require(p, t.causal, "model.text.causal must be true")
        _require(p, t.output_dim is not None, "model.text.output_dim must be set (a projection)")
        _require(p, t.eot_token_id != _LEGACY_EOS, "model.text.eot_token_id=2 means argmax pooling to transformers")
    for name, tower in (("vision", v), ("text", t)):
        if tower is None:
            continue
        _require(p, tower.activation in _TO_HF_ACT, f"model.{name}.activation={tower.activation!r} has no equivalent")
        _require(p, tower.normalization == "layernorm", f"model.{name}.normalization must be layernorm")
        _require(p, tower.bias, f"model.{name}.bias must be true")
    if p:
        raise ModelFormatError("cannot export to Hugging Face CLIP: " + "; ".join(p))


def _hf_tower(tower: Any) -> dict:
    return {
        "hidden_size": tower.hidden_size,
        "intermediate_size": tower.ffn_size,
        "num_hidden_layers": tower.num_layers,
        "num_attention_heads": tower.num_attention_heads,
        "hidden_act": _TO_HF_ACT[tower.activation],
        "layer_norm_eps": tower.layernorm_epsilon,
        "attention_dropout": tower.attention_dropout,
        "projection_dim": tower.output_dim,
    }


def hf_config_dict(cfg: ModelConfig, bos_token_id: int | None = None) -> dict:
    """The transformers CLIPModel config.json of a vlkit CLIP config (checked to have one)."""
    _check_exportable(cfg)
    v, t = cfg.vision, cfg.text
    text = {
        "model_type": "clip_text_model",
        **_hf_tower(t),
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.encoder_seq_length,
        "eos_token_id": t.eot_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    vision = {
        "model_type": "clip_vision_model",
        **_hf_tower(v),
        "image_size": v.img_h,
        "patch_size": v.patch_dim,
        "num_channels": v.num_channels,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.output_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": text,
        "vision_config": vision,
    }


def preprocessor_config_dict(v: VisionConfig) -> dict:
    """A CLIPImageProcessor config giving a vlkit vision tower its input (resize, centre crop, normalise)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": min(v.img_h, v.img_w)},
        "resample": _TO_PIL_RESAMPLE[v.resize_interpolation],
        "do_center_crop": True,
        "crop_size": {"height": v.img_h, "width": v.img_w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.mean),
        "image_std": list(v.std),
    }


# -- weights ---------------------------------------------------------------------------------------------------------


# transformers -> vlkit names inside a block, q/k/v aside.
_BLOCK_NAMES = (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))  # fmt: skip


def _layer_pairs(hf: str, vl: str, num_layers: int) -> list[tuple[str, str]]:
    """(transformers name, vlkit name) of every tensor of the blocks but q/k/v, which are fused."""
    pairs = []
    for i in range(num_layers):
        h, b = f"{hf}encoder.layers.{i}.", f"{vl}transformer.blocks.{i}."
        for hf_name, vl_name in _BLOCK_NAMES:
            pairs += [(f"{h}{hf_name}.weight", f"{b}{vl_name}.weight"), (f"{h}{hf_name}.bias", f"{b}{vl_name}.bias")]
    return pairs


def _vision_pairs(hf: str, vl: str, num_layers: int) -> list[tuple[str, str]]:
    pairs = [
        (f"{hf}embeddings.class_embedding", f"{vl}class_token"),
        (f"{hf}embeddings.patch_embedding.weight", f"{vl}patch_embed.proj.weight"),
        (f"{hf}embeddings.position_embedding.weight", f"{vl}pos_embed"),
        (f"{hf}pre_layrnorm.weight", f"{vl}norm_pre.weight"),
        (f"{hf}pre_layrnorm.bias", f"{vl}norm_pre.bias"),
        (f"{hf}post_layernorm.weight", f"{vl}norm.weight"),
        (f"{hf}post_layernorm.bias", f"{vl}norm.bias"),
    ]
    return pairs + _layer_pairs(hf, vl, num_layers)


def _text_pairs(hf: str, vl: str, num_layers: int) -> list[tuple[str, str]]:
    pairs = [
        (f"{hf}embeddings.token_embedding.weight", f"{vl}token_embed.weight"),
        (f"{hf}embeddings.position_embedding.weight", f"{vl}pos_embed"),
        (f"{hf}final_layer_norm.weight", f"{vl}norm.weight"),
        (f"{hf}final_layer_norm.bias", f"{vl}norm.bias"),
    ]
    return pairs + _layer_pairs(hf, vl, num_layers)


def _qkv_names(hf: str, vl: str, num_layers: int) -> list[tuple[list[str], str]]:
    out = []
    for i in range(num_layers):
        h, b = f"{hf}encoder.layers.{i}.self_attn.", f"{vl}transformer.blocks.{i}.attn.qkv."
        out += [([f"{h}{x}_proj.{kind}" for x in "qkv"], f"{b}{kind}") for kind in ("weight", "bias")]
    return out


def _layout(cfg: ModelConfig, vision_prefix: str = "vision_model.", with_text: bool = True):
    """Name pairs (plain copies), q/k/v triples with their head counts, and the scalar/vector reshapes."""
    v, t = cfg.vision, cfg.text
    pairs = _vision_pairs(vision_prefix, "visual.", v.num_layers)
    qkv = [(names, vl, v.num_attention_heads) for names, vl in _qkv_names(vision_prefix, "visual.", v.num_layers)]
    if v.output_dim:
        pairs.append(("visual_projection.weight", "visual.proj.weight"))
    if with_text and t is not None:
        pairs += _text_pairs("text_model.", "text.", t.num_layers)
        qkv += [(names, vl, t.num_attention_heads) for names, vl in _qkv_names("text_model.", "text.", t.num_layers)]
        pairs += [("text_projection.weight", "text.proj.weight"), ("logit_scale", "logit_scale")]
    return pairs, qkv


def hf_to_vlkit_state(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str | Path, vision_prefix: str = "vision_model."
) -> dict[str, torch.Tensor]:
    """transformers CLIP tensors -> vlkit names and layout. Every tensor must be used (buffers aside).

    Two tensors change shape: class_embedding [W] -> class_token [1, 1, W], logit_scale [] -> [1].
    """
    with_text = cfg.arch == "clip"
    pairs, qkv = _layout(cfg, vision_prefix, with_text)
    needed = [h for h, _ in pairs] + [n for names, _, _ in qkv for n in names]
    missing = [k for k in needed if k not in hf]
    if missing:
        raise ModelFormatError(f"{where}: weights miss {len(missing)} tensors the config needs, e.g. {missing[:4]}")
    used = set(needed)
    # position_ids are buffers older versions saved. A vision tower alone may leave the rest of a CLIPModel unused.
    left = [k for k in hf if k not in used and not k.endswith("position_ids")]
    if left and with_text:
        raise ModelFormatError(f"{where}: {len(left)} weights the config does not explain, e.g. {left[:4]}")
    state = {vl: hf[h] for h, vl in pairs}
    if "visual.class_token" in state:
        state["visual.class_token"] = state["visual.class_token"].reshape(1, 1, -1)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    for (q, k, v), vl, heads in qkv:
        state[vl] = fuse_qkv(hf[q], hf[k], hf[v], heads)
    return state


def vlkit_to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """vlkit CLIP tensors -> transformers CLIPModel names and layout (contiguous, ready for safetensors)."""
    pairs, qkv = _layout(cfg)
    out = {}
    for h, vl in pairs:
        t = state[vl]
        if vl == "visual.class_token":
            t = t.reshape(-1)
        elif vl == "logit_scale":
            # transformers does not clamp: hand over the scale vlkit actually uses.
            t = t.clamp(max=cfg.logit_scale_max).reshape(())
        out[h] = t.detach().contiguous().cpu()
    for names, vl, heads in qkv:
        for name, t in zip(names, unfuse_qkv(state[vl], heads)):
            out[name] = t.detach().cpu()
    return out


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory: one weights file or the shards an index names."""
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return read_weights_file(path / name)
    for name in HF_INDEXES:
        if (path / name).is_file():
            index = read_json(path / name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{path / name}: no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or Path(shard).name != shard:  # a file next to the index, nothing else
                    raise ModelFormatError(f"{path / name}: shard {shard!r} is not a file name in {path}")
                if not (path / shard).is_file():
                    raise ModelFormatError(f"{path / name}: shard {shard} is missing")
                state.update(read_weights_file(path / shard))
            return state
    names = ", ".join(sorted(p.name for p in path.iterdir()))
    raise ModelFormatError(f"{path}: no {' / '.join(HF_WEIGHTS + HF_INDEXES)} (found: {names})")


def _declared_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """Meta tensors of what a transformers directory's safetensors files declare (headers only); None for pickled
    weights (``.bin``), whose shapes cannot be known without loading them, or an index read_hf_weights will refuse."""
    if (path / HF_WEIGHTS[0]).is_file():
        return declared_tensors(path / HF_WEIGHTS[0])
    if (path / HF_WEIGHTS[1]).is_file() or not (path / HF_INDEXES[0]).is_file():
        return None
    weight_map = read_json(path / HF_INDEXES[0]).get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    shards = set(weight_map.values())
    if not all(isinstance(n, str) and Path(n).name == n and (path / n).is_file() for n in shards):
        return None
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shards):
        out.update(declared_tensors(path / name))
    return out


def _vision_prefix(keys: list[str]) -> str:
    """'vision_model.' in CLIPModel and older CLIPVisionModel files; transformers 5 saves a vision model without it."""
    suffix = "embeddings.patch_embedding.weight"
    return next((k[: -len(suffix)] for k in keys if k.endswith(suffix)), "vision_model.")


# -- tokenizer -------------------------------------------------------------------------------------------------------


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer files of a transformers directory vlkit can use (vocab.json + merges.txt and/or tokenizer.json),
    with the config files describing them."""
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not (has_bpe or (path / "tokenizer.json").is_file()):
        return []
    return [name for name in TOKENIZER_FILES if (path / name).is_file()]


def _is_openai_bpe(path: Path) -> bool:
    """Whether vocab.json + merges.txt are OpenAI CLIP's vocabulary (the one vlkit ships as ``clip``)."""
    from vlkit.data.tokenizer import CLIPTokenizer, read_merges

    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        return False
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        if len(vocab) != CLIP_VOCAB_SIZE:
            return False
        merges = read_merges(merges_file, limit=None)
    except (OSError, ValueError):
        return False
    reference = CLIPTokenizer.from_bpe_file()
    if len(vocab) != len(reference.vocab) or merges != reference.merges:
        return False
    renamed = {HF_BOS: reference.bos_token, HF_EOS: reference.eos_token}
    return all(reference.vocab.get(renamed.get(t, t)) == i for t, i in vocab.items())


def _tokenizer_setting(path: Path, files: list[str], vocab_size: int) -> str:
    """model.text.tokenizer for a converted directory: ``clip`` for OpenAI's vocabulary (portable, exact), else the
    directory holding the copied files."""
    if files and not _is_openai_bpe(path):
        return str(Path(path).resolve())
    if not files and vocab_size < CLIP_VOCAB_SIZE:
        warnings.warn(
            f"{path}: no tokenizer files; model.text.tokenizer defaults to clip, whose {CLIP_VOCAB_SIZE} ids exceed "
            f"this model's vocab_size={vocab_size}",
            stacklevel=3,
        )
    return "clip"


def write_clip_bpe(directory: Path, context_length: int) -> list[str]:
    """Write vlkit's CLIP vocabulary as transformers' CLIPTokenizer files (its special-token names, padding with
    end-of-text as OpenAI's checkpoints on the Hub do)."""
    from vlkit.data.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_bpe_file()
    renamed = {tok.bos_token: HF_BOS, tok.eos_token: HF_EOS}
    vocab = {renamed.get(t, t): i for t, i in tok.vocab.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tok.merges)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": HF_BOS,
                "eos_token": HF_EOS, "pad_token": HF_EOS, "unk_token": HF_EOS}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return ["vocab.json", "merges.txt", "tokenizer_config.json"]


def _export_tokenizer(setting: str, text: Any, directory: Path) -> list[str]:
    """Put the model's tokenizer next to an exported model (as transformers files); the names written."""
    from vlkit.data.tokenizer import CLIP_NAMES

    if setting.lower() in CLIP_NAMES:
        if text.vocab_size < CLIP_VOCAB_SIZE:
            warnings.warn(
                f"model.text.tokenizer={setting} has {CLIP_VOCAB_SIZE} ids, more than model.text.vocab_size="
                f"{text.vocab_size}: no tokenizer written next to the exported model",
                stacklevel=3,
            )
            return []
        return write_clip_bpe(directory, text.encoder_seq_length)
    source = Path(setting).expanduser()
    files = tokenizer_files(source) if source.is_dir() else []
    if source.is_file() and source.name == "tokenizer.json":
        source, files = source.parent, ["tokenizer.json"]
    if not files:
        warnings.warn(f"tokenizer {setting!r}: no tokenizer files to copy next to the exported model", stacklevel=3)
    for name in files:
        shutil.copyfile(source / name, directory / name)
    return files


def _bos_token_id(setting: str, vocab_size: int) -> int | None:
    """The tokenizer's start-of-text id, for config.json (None when unknown or outside the model's vocabulary)."""
    from vlkit.data.tokenizer import get_tokenizer

    try:
        bos = get_tokenizer(setting).bos_token_id
    except (OSError, ValueError):
        return None
    return bos if bos is not None and bos < vocab_size else None


# -- public API ------------------------------------------------------------------------------------------------------


def _read_preprocessor(path: Path) -> dict | None:
    file = path / PREPROCESSOR_FILE
    return read_json(file) if file.is_file() else None


def _fit_logit_scale(cfg: dict, state: dict[str, torch.Tensor]) -> None:
    """Raise logit_scale_max to the stored scale when it lies above ln 100 (OpenAI stores 4.6052 > 4.60517...),
    so vlkit's clamp leaves the converted model's logits exactly as transformers computes them."""
    stored = float(state["logit_scale"].reshape(-1)[0])
    if stored > math.log(100.0):
        cfg["logit_scale_max"] = stored
    cfg["logit_scale_init"] = min(cfg["logit_scale_init"], cfg.get("logit_scale_max", math.log(100.0)))


@contextlib.contextmanager
def _shape_errors(path: Path):
    """Tensors whose shapes contradict config.json (torch raises RuntimeError) as a ModelFormatError naming the path."""
    try:
        yield
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln or "shape" in ln), lines[0] if lines else "")
        raise ModelFormatError(f"{path}: weights do not fit {CONFIG_FILE}: {detail}") from None


def load_hf(path: str | Path, *, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """A vlkit CLIPModel from a transformers CLIPModel directory (weights, preprocessing and tokenizer settings).

    Args:
        path: the directory (config.json + model.safetensors, shards with an index, or pytorch_model.bin).
        device: where the model is built.
        **overrides: model config overrides, as for :func:`vlkit.load_model` (e.g. ``vision__img_h=336``).

    Raises:
        ModelFormatError: not a transformers CLIP directory, or weights that do not fit its config.
    """
    from vlkit.interop.files import with_overrides

    path = Path(path)
    config = read_hf_config(path)
    if not is_hf_clip_config(config):
        raise ModelFormatError(
            f"{path}: a Hugging Face CLIP vision tower only (no text tower); load it with vlkit.load_vision_encoder"
        )
    cfg = hf_model_config(config, _read_preprocessor(path), path / CONFIG_FILE)
    declared = _declared_weights(path)
    if declared is not None:  # shapes and size against config.json before anything is allocated
        shape_cfg = resolve_model_config(cfg)
        with _shape_errors(path):
            stored = {k: tuple(t.shape) for k, t in hf_to_vlkit_state(declared, shape_cfg, path).items()}
        check_before_loading(lambda: CLIPModel(shape_cfg), stored, path / CONFIG_FILE, config, device=device)
    hf_state = read_hf_weights(path)
    cfg["text"]["tokenizer"] = _tokenizer_setting(path, tokenizer_files(path), cfg["text"]["vocab_size"])
    _fit_logit_scale(cfg, hf_state)
    model_cfg = resolve_model_config(cfg)
    with torch.device(device):
        model = CLIPModel(model_cfg)  # the config is resolved already: skip create_model's second pass
    with _shape_errors(path):
        model.load_state_dict(hf_to_vlkit_state(hf_state, model_cfg, path), strict=True)
    return with_overrides(model, device, **overrides)


def load_hf_vision_tower(path: str | Path, *, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """The vision tower (a :class:`vlkit.models.VisionTransformer`, no projection) of a transformers CLIPModel or
    CLIPVisionModel directory; ``overrides`` as for :func:`load_hf` (``vision__img_h=336``, ...)."""
    from vlkit.interop.files import fit_pos_embed
    from vlkit.models.vit import VisionTransformer

    path = Path(path)
    config = read_hf_config(path)
    tower_cfg = {"arch": "vit_classifier", "vision": hf_vision_section(config, _read_preprocessor(path), path)}
    source = resolve_model_config(tower_cfg)
    hf_state = read_hf_weights(path)
    with torch.device(device):
        tower = VisionTransformer(resolve_model_config(tower_cfg, **overrides).vision)
    with _shape_errors(path):
        state = hf_to_vlkit_state(hf_state, source, path, vision_prefix=_vision_prefix(list(hf_state)))
        state = {k.removeprefix("visual."): v for k, v in state.items()}
        fit_pos_embed(state, tower, source.vision.grid_size)
        tower.load_state_dict(state, strict=True)
    return tower


def convert_hf_to_vlkit(src: str | Path, out: str | Path) -> nn.Module:
    """Write a transformers CLIP directory as a vlkit directory (config, weights and the tokenizer files), atomically.

    Returns the converted model (as :func:`vlkit.load_model` would load it from ``out``).
    """
    src, out = Path(src), Path(out)
    model = load_hf(src)
    files = tokenizer_files(src)
    if model.config.text.tokenizer.lower() != "clip":
        model.config.text.tokenizer = str(out.resolve())  # the copies written next to the weights
    save_converted(model, out, src, files, {"format": "hf", "path": str(src)})
    return model


def save_hf(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a vlkit CLIP model as a transformers CLIPModel directory that ``CLIPModel.from_pretrained`` loads.

    Writes config.json, model.safetensors, preprocessor_config.json and the tokenizer (vocab.json + merges.txt for
    the CLIP tokenizer, else the files of the model's tokenizer directory).

    Raises:
        ModelFormatError: the model has a feature transformers' CLIP lacks (the message lists them all).
    """
    model = getattr(model, "_orig_mod", model)
    cfg: ModelConfig = model.config
    _check_exportable(cfg)
    setting = cfg.text.tokenizer
    config = hf_config_dict(cfg, bos_token_id=_bos_token_id(setting, cfg.text.vocab_size))
    tensors = vlkit_to_hf_state(clean_state_dict(model), cfg)
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor_config_dict(cfg.vision), indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _export_tokenizer(setting, cfg.text, tmp)

    atomic_write_dir(out_dir, write)
    return out_dir
