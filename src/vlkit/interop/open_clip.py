"""open_clip checkpoints <-> vlkit CLIP models, with exact parity.

open_clip's standard CLIP (a ``VisionTransformer`` image tower and a ``TextTransformer`` text tower) maps one to one
onto vlkit's :class:`~vlkit.models.clip.CLIPModel`; only names and three layouts differ:

- attention: open_clip fuses q, k and v as ``in_proj = [Q; K; V]`` (all heads of q, then of k, then of v); vlkit
  interleaves them per key/value group, ``[q_h; k_h; v_h]`` for each head h (see :class:`vlkit.nn.Attention`);
- projections: open_clip stores ``proj`` / ``text_projection`` as ``[width, embed_dim]`` matrices used as
  ``x @ proj``; vlkit uses ``nn.Linear`` weights, their transpose;
- the class embedding is ``[width]`` in open_clip and ``[1, 1, width]`` in vlkit.

Everything else a checkpoint's behaviour depends on travels in the config: QuickGELU vs GELU (OpenAI's weights need
QuickGELU; open_clip's plain ``ViT-B-32`` config is GELU, and loading one into the other silently costs accuracy),
layer-norm epsilon, pooling, and the preprocessing (mean, std, interpolation; open_clip's ``resize_mode: shortest``
is vlkit's ``crop_style: openai``). Options vlkit cannot reproduce (layer scale, attentional pooling, timm or
Hugging Face towers, ResNets, SigLIP's logit bias, ...) are refused up front, all named in one error, rather than
half-loaded. Weight conversion is strict: every source tensor is consumed and every vlkit tensor filled, with shapes
checked against the config, or a :class:`ModelFormatError` lists what is missing, unexpected or mis-shaped.

Exported directories use the layout open_clip reads offline::

    open_clip.create_model("local-dir:" + str(out_dir))   # open_clip_config.json + open_clip_model.safetensors

``create_model(name, pretrained=str(out_dir / "open_clip_model.safetensors"))`` works too once the ``model_cfg``
is registered under ``name`` with ``open_clip.add_model_config(json_file)``; ``pretrained=out_dir`` does not (open_clip
takes a file or a tag there). Exporting a model with Hugging Face's crop style, or with a tokenizer given by path,
warns: open_clip has only OpenAI's crop and CLIP's BPE. Loaded weights are float32, as :func:`vlkit.load_model` gives
them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlkit.config import ConfigError, ModelConfig
from vlkit.config.schema import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlkit.interop.files import (
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_WEIGHTS_FILE,
    ModelFormatError,
    atomic_write_dir,
    read_weights_file,
)
from vlkit.models.factory import create_model, resolve_model_config
from vlkit.nn.attention import fuse_qkv, unfuse_qkv

# The weight files open_clip looks for in a local or Hugging Face hub directory, in its order of preference.
WEIGHTS_FILES = (
    OPEN_CLIP_WEIGHTS_FILE,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
QUICKGELU_SUFFIX = "-quickgelu"
# open_clip's nn.LayerNorm default; a config only names another value (``norm_kwargs: {eps: ...}``).
DEFAULT_LN_EPS = 1e-5
# Names under which vlkit.data.tokenizer serves CLIP's BPE, the tokenizer of every standard open_clip text tower.
CLIP_TOKENIZER_NAMES = ("clip", "openai", "openai-clip", "clip-bpe", "open_clip")
CLIP_VOCAB_SIZE = 49408

# Options of open_clip's tower configs that vlkit cannot reproduce: option -> (values that are fine, what it is).
_UNSUPPORTED_COMMON = {
    "ls_init_value": ((None,), "layer scale"),
    "act_kwargs": ((None, {}), "activation arguments"),
    "block_type": ((None, "default"), "custom attention blocks"),
    "qk_norm": ((False, None), "q/k normalisation"),
    "scaled_cosine_attn": ((False, None), "scaled cosine attention"),
    "scale_heads": ((False, None), "per-head attention scales"),
    "scale_attn_inner": ((False, None), "a norm inside attention"),
    "scale_attn": ((False, None), "a norm after attention"),
    "scale_fc": ((False, None), "a norm inside the MLP"),
}
_UNSUPPORTED_VISION = {
    **_UNSUPPORTED_COMMON,
    "attentional_pool": ((False, None, ""), "attentional pooling (CoCa)"),
    "pos_embed_type": (("learnable",), "fixed sin-cos position embeddings"),
    "timm_model_name": ((None, ""), "timm image towers"),
}
_UNSUPPORTED_TEXT = {
    **_UNSUPPORTED_COMMON,
    "embed_cls": ((False, None), "an appended class token"),
    "no_causal_mask": ((False, None), "a bidirectional text tower without padding mask"),
    "proj_bias": ((False, None), "a bias on the text projection"),
    "proj_type": (("linear",), "a text projection other than one matrix"),
    "hf_model_name": ((None, ""), "Hugging Face text towers"),
    "hf_tokenizer_name": ((None, ""), "Hugging Face tokenizers"),
    "tokenizer_mode": ((None, ""), "tokenizer modes"),
    "tokenizer_kwargs": ((None, {}), "tokenizer arguments"),
}
# Options read below, and options that only matter for a feature refused above (or only for open_clip's outputs).
_VISION_READ = {
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "patch_dropout",
    "no_ln_pre",
    "pool_type",
    "final_ln_after_pool",
    "norm_kwargs",
}
_VISION_IGNORED = {
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
_TEXT_READ = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "pad_id",
    "eos_id",
    "pool_type",
    "final_ln_after_pool",
    "norm_kwargs",
}
_TEXT_IGNORED = {"output_tokens", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_READ = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
_TOP_IGNORED = {"custom_text", "nonscalar_logit_scale", "output_dict"}  # layout and output flags only
_TOP_UNSUPPORTED = {
    "init_logit_bias": ((None,), "a logit bias (SigLIP)"),
    "multimodal_cfg": ((None,), "a text decoder (CoCa)"),
}


# ----------------------------------------------------------------------------------------------------------- config


def _check_options(problems: list[str], where: str, cfg: dict, read: set, ignored: set, unsupported: dict) -> None:
    for key, value in cfg.items():
        if key in unsupported:
            fine, what = unsupported[key]
            if value not in fine:
                problems.append(f"{where}.{key}={value!r}: {what} is not supported by vlkit")
        elif key not in read and key not in ignored:
            problems.append(f"{where}.{key}: unknown open_clip option (not understood by this converter)")


def _norm_eps(problems: list[str], where: str, cfg: dict) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        problems.append(f"{where}.norm_kwargs={kwargs!r}: only eps is supported")
    return float(kwargs.get("eps", DEFAULT_LN_EPS))


def _ffn(width: int, mlp_ratio: float) -> int:
    return int(width * mlp_ratio)  # open_clip's own rule for the MLP width


def _vision_config(problems: list[str], v: dict, embed_dim: int, activation: str, pre: dict) -> dict:
    _check_options(problems, "vision_cfg", v, _VISION_READ, _VISION_IGNORED, _UNSUPPORTED_VISION)
    layers = v.get("layers", 12)
    if not isinstance(layers, int):
        problems.append(f"vision_cfg.layers={layers!r}: ResNet image towers are not supported by vlkit")
        layers = 1
    width, head_width = v.get("width", 768), v.get("head_width", 64)
    patch = v.get("patch_size", 16)
    if not isinstance(patch, int):
        problems.append(f"vision_cfg.patch_size={patch!r}: only square patches are supported by vlkit")
    size = v.get("image_size", 224)
    img_h, img_w = (size, size) if isinstance(size, int) else tuple(size)
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        problems.append(f"vision_cfg.pool_type={pool!r}: only tok and avg pooling are supported by vlkit")
    if v.get("final_ln_after_pool") and pool != "tok":
        # With the class token the norm commutes with picking it; with averaging it does not.
        problems.append("vision_cfg.final_ln_after_pool=True with pool_type=avg is not supported by vlkit")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        problems.append(f"preprocess_cfg.interpolation={interpolation!r}: vlkit resizes bicubic or bilinear")
    resize_mode = pre.get("resize_mode", "shortest")
    if resize_mode != "shortest":
        problems.append(
            f"preprocess_cfg.resize_mode={resize_mode!r}: vlkit resizes the shortest side and centre-crops "
            "(open_clip's 'shortest'); other modes would silently change the model's inputs"
        )
    return {
        "num_layers": layers,
        "hidden_size": width,
        "num_attention_heads": max(width // head_width, 1),
        "ffn_hidden_size": _ffn(width, v.get("mlp_ratio", 4.0)),
        "activation": activation,
        "layernorm_epsilon": _norm_eps(problems, "vision_cfg", v),
        "patch_dim": patch,
        "img_h": img_h,
        "img_w": img_w,
        "class_token_length": 1,
        "pre_norm": not v.get("no_ln_pre", False),
        "patch_bias": False,
        "global_average_pool": pool == "avg",
        "drop_patch_rate": float(v.get("patch_dropout", 0.0)),
        "image_mean": [float(x) for x in pre.get("mean", OPENAI_CLIP_MEAN)],
        "image_std": [float(x) for x in pre.get("std", OPENAI_CLIP_STD)],
        "crop_style": "openai",
        "resize_interpolation": interpolation,
        "output_dim": embed_dim,
    }


def _text_config(problems: list[str], t: dict, embed_dim: int, activation: str) -> dict:
    _check_options(problems, "text_cfg", t, _TEXT_READ, _TEXT_IGNORED, _UNSUPPORTED_TEXT)
    vocab = t.get("vocab_size", 49408)
    pool = t.get("pool_type", "argmax")
    if pool == "argmax":
        # open_clip pools at the highest token id of a row: CLIP's end-of-text, the last id of the vocabulary.
        pooling, eot = "eot", vocab - 1
    elif pool == "eos":
        pooling, eot = "eot", t.get("eos_id", 2)
    elif pool == "first":
        pooling, eot = "first", vocab - 1
    else:
        problems.append(f"text_cfg.pool_type={pool!r}: only argmax, eos and first pooling are supported by vlkit")
        pooling, eot = "eot", vocab - 1
    width = t.get("width", 512)
    return {
        "num_layers": t.get("layers", 12),
        "hidden_size": width,
        "num_attention_heads": t.get("heads", 8),
        "ffn_hidden_size": _ffn(width, t.get("mlp_ratio", 4.0)),
        "activation": activation,
        "layernorm_epsilon": _norm_eps(problems, "text_cfg", t),
        "encoder_seq_length": t.get("context_length", 77),
        "vocab_size": vocab,
        "pooling": pooling,
        "eot_token_id": eot,
        "pad_token_id": t.get("pad_id", 0),
        "causal": True,
        "tokenizer": "clip",
        "output_dim": embed_dim,
    }


def config_from_open_clip(
    model_cfg: dict,
    preprocess_cfg: dict | None = None,
    *,
    quick_gelu: bool = False,
    source: str = "open_clip config",
) -> ModelConfig:
    """The vlkit model config of an open_clip ``model_cfg`` (and optional ``preprocess_cfg``).

    Args:
        model_cfg: open_clip's model config: ``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``, ...
        preprocess_cfg: ``mean``, ``std``, ``interpolation``, ``resize_mode``; None: open_clip's defaults (OpenAI's).
        quick_gelu: force QuickGELU, as open_clip does for a model name ending in ``-quickgelu``.
        source: names the config in error messages.

    Raises:
        ModelFormatError: an option vlkit cannot reproduce (all of them are listed), or dimensions vlkit rejects.
    """
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelFormatError(f"{source}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    problems: list[str] = []
    _check_options(problems, "model_cfg", model_cfg, _TOP_READ, _TOP_IGNORED, _TOP_UNSUPPORTED)
    activation = "quick_gelu" if quick_gelu or model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = model_cfg["embed_dim"]
    vision = _vision_config(problems, model_cfg["vision_cfg"], embed_dim, activation, preprocess_cfg or {})
    text = _text_config(problems, model_cfg["text_cfg"], embed_dim, activation)
    if problems:
        raise ModelFormatError(f"{source}: cannot convert this open_clip model:\n  " + "\n  ".join(problems))
    tree = {"arch": "clip", "output_dim": embed_dim, "vision": vision, "text": text}
    if "init_logit_scale" in model_cfg:
        tree["logit_scale_init"] = float(model_cfg["init_logit_scale"])
    try:
        return resolve_model_config(tree)
    except ConfigError as e:
        raise ModelFormatError(f"{source}: the open_clip config gives an invalid vlkit config: {e}") from None


def _model_config(model: nn.Module | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DistributedDataParallel
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} carries no vlkit ModelConfig (was it built by vlkit.create_model?)")
    return cfg


def _size(h: int, w: int) -> int | list[int]:
    return h if h == w else [h, w]


def _mlp_ratio(problems: list[str], tower: str, width: int, ffn: int) -> float:
    ratio = ffn / width
    if _ffn(width, ratio) != ffn:
        problems.append(f"model.{tower}.ffn_hidden_size={ffn}: open_clip's int(width * mlp_ratio) cannot give it")
    return ratio


def open_clip_config(model: nn.Module | ModelConfig) -> dict:
    """The ``open_clip_config.json`` content of a vlkit CLIP model: ``{"model_cfg": ..., "preprocess_cfg": ...}``.

    Training-only settings open_clip's standard towers lack (drop path, dropout) are not carried.

    Raises:
        ModelFormatError: the model uses something open_clip's standard CLIP cannot express (all are listed).
    """
    cfg = _model_config(model)
    problems: list[str] = []
    if cfg.arch != "clip" or cfg.text is None:
        raise ModelFormatError(f"model.arch={cfg.arch!r}: only CLIP models can be exported to open_clip")
    v, t = cfg.vision, cfg.text
    for name, tower in (("vision", v), ("text", t)):
        if tower.activation not in ("gelu", "quick_gelu"):
            problems.append(f"model.{name}.activation={tower.activation!r}: open_clip has gelu or quick_gelu")
        if tower.normalization != "layernorm":
            problems.append(f"model.{name}.normalization={tower.normalization!r}: open_clip has layernorm")
        if not tower.bias:
            problems.append(f"model.{name}.bias=False: open_clip's projections have biases")
    if v.activation != t.activation:
        problems.append(
            f"model.vision.activation={v.activation!r} and model.text.activation={t.activation!r} "
            "differ: open_clip has one quick_gelu flag for both towers"
        )
    if v.class_token_length != 1:
        problems.append(f"model.vision.class_token_length={v.class_token_length}: open_clip has one class token")
    if v.patch_bias:
        problems.append("model.vision.patch_bias=True: open_clip's patch embedding has no bias")
    if v.num_channels != 3:
        problems.append(f"model.vision.num_channels={v.num_channels}: open_clip reads RGB images")
    if not t.causal:
        problems.append("model.text.causal=False: open_clip's bidirectional text tower does not mask padding")
    # open_clip tokenizes with CLIP's BPE. A tokenizer given by path (a Hugging Face CLIP's vocab.json + merges.txt)
    # is taken to be that BPE when the vocabulary has its size; any other vocabulary cannot be.
    foreign_tokenizer = str(t.tokenizer).lower() not in CLIP_TOKENIZER_NAMES
    if foreign_tokenizer and t.vocab_size != CLIP_VOCAB_SIZE:
        problems.append(
            f"model.text.tokenizer={t.tokenizer!r} with vocab_size={t.vocab_size}: open_clip would tokenize with "
            f"CLIP's BPE ({CLIP_VOCAB_SIZE} tokens) instead"
        )
    vision_cfg: dict[str, Any] = {
        "image_size": _size(v.img_h, v.img_w),
        "layers": v.num_layers,
        "width": v.hidden_size,
        "head_width": v.head_dim,
        "mlp_ratio": _mlp_ratio(problems, "vision", v.hidden_size, v.ffn_size),
        "patch_size": v.patch_dim,
    }
    if not v.pre_norm:
        vision_cfg["no_ln_pre"] = True
    if v.global_average_pool:
        vision_cfg["pool_type"] = "avg"
    if v.drop_patch_rate:
        vision_cfg["patch_dropout"] = v.drop_patch_rate
    if v.layernorm_epsilon != DEFAULT_LN_EPS:
        vision_cfg["norm_kwargs"] = {"eps": v.layernorm_epsilon}
    text_cfg: dict[str, Any] = {
        "context_length": t.encoder_seq_length,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_layers,
        "mlp_ratio": _mlp_ratio(problems, "text", t.hidden_size, t.ffn_size),
    }
    if t.pooling == "first":
        text_cfg["pool_type"] = "first"
    elif t.eot_token_id != t.vocab_size - 1:  # argmax finds end-of-text only when it is the highest id
        text_cfg["pool_type"], text_cfg["eos_id"] = "eos", t.eot_token_id
    if t.pad_token_id != 0:
        text_cfg["pad_id"] = t.pad_token_id
    if t.layernorm_epsilon != DEFAULT_LN_EPS:
        text_cfg["norm_kwargs"] = {"eps": t.layernorm_epsilon}
    if problems:
        raise ModelFormatError("cannot export this model to open_clip:\n  " + "\n  ".join(problems))
    if v.crop_style != "openai":
        warnings.warn(
            f"model.vision.crop_style={v.crop_style!r}: open_clip centre-crops as OpenAI does, which can sit one "
            "pixel off this model's crop on some image sizes",
            stacklevel=2,
        )
    if foreign_tokenizer:
        warnings.warn(
            f"model.text.tokenizer={t.tokenizer!r}: the export assumes it is CLIP's BPE, which open_clip will use",
            stacklevel=2,
        )
    model_cfg: dict[str, Any] = {
        "embed_dim": v.output_dim,
        "quick_gelu": v.activation == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if not math.isclose(cfg.logit_scale_init, math.log(1 / 0.07)):
        model_cfg["init_logit_scale"] = cfg.logit_scale_init
    preprocess_cfg = {
        "size": _size(v.img_h, v.img_w),
        "mode": "RGB",
        "mean": list(v.mean),
        "std": list(v.std),
        "interpolation": v.resize_interpolation,
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def builtin_model_config(model_name: str) -> dict:
    """The model config open_clip ships for ``model_name`` (e.g. ``ViT-B-32-quickgelu``), read offline from the
    installed package's ``model_configs`` without importing open_clip."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ModelFormatError(f"model name {model_name!r}: give the directory itself (hub downloads are not made)")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            f"model name {model_name!r} needs the open_clip package (pip install open_clip_torch) for its config; "
            "or pass the model config as a JSON file"
        )
    config_dir = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    path = config_dir / f"{model_name.replace('/', '-')}.json"
    if not path.is_file():
        names = sorted(p.stem for p in config_dir.glob("*.json"))
        close = difflib.get_close_matches(model_name, names, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelFormatError(f"unknown open_clip model name {model_name!r}{hint}; open_clip has {len(names)}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class _Entry:
    """One tensor: its vlkit and open_clip names and the layout change between them."""

    vlkit: str
    open_clip: str
    to_vlkit: Callable[[torch.Tensor], torch.Tensor]
    to_open_clip: Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _qkv_to_vlkit(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[Q; K; V] rows (open_clip's in_proj) -> vlkit's per-head [q_h; k_h; v_h] rows (one key/value group per head)."""
    return lambda t: fuse_qkv(*t.chunk(3), heads)


def _qkv_to_open_clip(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.cat(unfuse_qkv(t, heads))


def _norm(vlkit: str, open_clip: str) -> list[_Entry]:
    return [_Entry(f"{vlkit}.{p}", f"{open_clip}.{p}", _same, _same) for p in ("weight", "bias")]


def _blocks(vlkit: str, open_clip: str, layers: int, heads: int) -> list[_Entry]:
    out = []
    for i in range(layers):
        v, o = f"{vlkit}.transformer.blocks.{i}", f"{open_clip}transformer.resblocks.{i}"
        out += _norm(f"{v}.norm1", f"{o}.ln_1")
        out += [
            _Entry(f"{v}.attn.qkv.weight", f"{o}.attn.in_proj_weight", _qkv_to_vlkit(heads), _qkv_to_open_clip(heads)),
            _Entry(f"{v}.attn.qkv.bias", f"{o}.attn.in_proj_bias", _qkv_to_vlkit(heads), _qkv_to_open_clip(heads)),
        ]
        out += _norm(f"{v}.attn.proj", f"{o}.attn.out_proj")
        out += _norm(f"{v}.norm2", f"{o}.ln_2")
        out += _norm(f"{v}.mlp.fc1", f"{o}.mlp.c_fc")  # Linear weight + bias: the same two names as a norm
        out += _norm(f"{v}.mlp.fc2", f"{o}.mlp.c_proj")
    return out


def _plan(cfg: ModelConfig, text_prefix: str = "") -> list[_Entry]:
    """Every tensor of a vlkit CLIP model with its open_clip name. ``text_prefix`` is ``"text."`` for the layout of
    open_clip's CustomTextCLIP, ``""`` for its CLIP."""
    v, t, tp = cfg.vision, cfg.text, text_prefix
    plan = [
        _Entry("logit_scale", "logit_scale", lambda x: x.reshape(1), lambda x: x.reshape(())),
        _Entry("visual.patch_embed.proj.weight", "visual.conv1.weight", _same, _same),
        _Entry("visual.class_token", "visual.class_embedding", lambda x: x.reshape(1, 1, -1), lambda x: x.reshape(-1)),
        _Entry("visual.pos_embed", "visual.positional_embedding", _same, _same),
    ]
    if v.pre_norm:
        plan += _norm("visual.norm_pre", "visual.ln_pre")
    plan += _blocks("visual", "visual.", v.num_layers, v.num_attention_heads)
    plan += _norm("visual.norm", "visual.ln_post")
    plan += [
        _Entry("visual.proj.weight", "visual.proj", _transpose, _transpose),
        _Entry("text.token_embed.weight", f"{tp}token_embedding.weight", _same, _same),
        _Entry("text.pos_embed", f"{tp}positional_embedding", _same, _same),
    ]
    plan += _blocks("text", tp, t.num_layers, t.num_attention_heads)
    plan += _norm("text.norm", f"{tp}ln_final")
    plan.append(_Entry("text.proj.weight", f"{tp}text_projection", _transpose, _transpose))
    return plan


def _text_prefix(keys: Iterable[str]) -> str:
    return "text." if "text.token_embedding.weight" in set(keys) else ""


def to_vlkit_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint") -> dict:
    """open_clip tensors -> a vlkit CLIP state dict (float32 copies), strictly.

    Raises:
        ModelFormatError: listing the open_clip keys that are missing, unexpected or of the wrong shape for ``cfg``.
    """
    expected = {k: v.shape for k, v in create_model(cfg, device="meta").state_dict().items()}
    plan = _plan(cfg, _text_prefix(state))
    if "logit_scale" in state and state["logit_scale"].numel() == 1:
        state = {**state, "logit_scale": state["logit_scale"].reshape(())}  # nonscalar_logit_scale stores it as [1]
    out, missing, wrong = {}, [], []
    for e in plan:
        if e.open_clip not in state:
            missing.append(e.open_clip)
            continue
        # The shape open_clip stores for this tensor: vlkit's shape taken through the inverse layout change.
        want = tuple(e.to_open_clip(torch.empty(expected[e.vlkit], device="meta")).shape)
        got = state[e.open_clip]
        if tuple(got.shape) != want:
            wrong.append(f"{e.open_clip}: {list(got.shape)} in the checkpoint, {list(want)} for the config")
            continue
        out[e.vlkit] = e.to_vlkit(got).to(dtype=torch.float32, copy=True).contiguous()
    unexpected = sorted(set(state) - {e.open_clip for e in plan})
    unfilled = sorted(set(expected) - {e.vlkit for e in plan})  # would mean the plan lags behind the model
    if missing or unexpected or wrong or unfilled:
        lines = [f"missing: {', '.join(missing)}"] if missing else []
        lines += [f"unexpected: {', '.join(unexpected)}"] if unexpected else []
        lines += [f"wrong shape: {w}" for w in wrong]
        lines += [f"vlkit tensors without a source: {', '.join(unfilled)}"] if unfilled else []
        raise ModelFormatError(f"{source}: the open_clip weights do not match the config:\n  " + "\n  ".join(lines))
    return out


def to_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A vlkit CLIP model's tensors under open_clip's names and layouts (contiguous CPU copies)."""
    model = getattr(model, "_orig_mod", model)
    state = {k.replace("_orig_mod.", ""): t for k, t in model.state_dict().items()}
    plan = _plan(_model_config(model))
    leftover = sorted(set(state) - {e.vlkit for e in plan})
    if leftover:
        raise ModelFormatError(f"cannot export to open_clip: no open_clip name for {', '.join(leftover)}")
    return {e.open_clip: e.to_open_clip(state[e.vlkit].detach()).contiguous().cpu().clone() for e in plan}


# --------------------------------------------------------------------------------------------------- files


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint file (safetensors, or a torch file read with ``weights_only=True``).

    A training checkpoint's ``{"state_dict": ..., "epoch": ...}`` wrapping and DDP's ``module.`` prefixes are removed.
    Nothing is ever unpickled beyond plain tensors and containers (see :func:`vlkit.interop.native.read_weights_file`).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such checkpoint file")
    state = read_weights_file(path)
    if not state:
        raise ModelFormatError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: t for k, t in state.items()}
    return state


def looks_like_open_clip_state_dict(keys: Iterable[str]) -> bool:
    """True for the keys of an open_clip (or OpenAI CLIP) state dict, with or without DDP's ``module.`` prefix.

    Deliberately broad (any open_clip image tower, both text layouts): loading then names what is unsupported.
    """
    names = {k[len("module.") :] if k.startswith("module.") else k for k in keys}
    has_text = "token_embedding.weight" in names or "text.token_embedding.weight" in names
    return has_text and "logit_scale" in names and any(k.startswith("visual.") for k in names)


def _read_dir_config(path: Path) -> dict | None:
    cfg_file = path / OPEN_CLIP_CONFIG_FILE
    if not cfg_file.is_file():
        return None
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict) else None


def is_open_clip_dir(path: str | Path) -> bool:
    """True for a directory holding an ``open_clip_config.json`` with a ``model_cfg`` (open_clip's hub layout)."""
    path = Path(path)
    return path.is_dir() and _read_dir_config(path) is not None


def _read_json_config(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: config file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None


def load_open_clip(src: str | Path, model_name: str | None = None, config: str | Path | None = None) -> nn.Module:
    """An open_clip CLIP checkpoint as a vlkit :class:`~vlkit.models.clip.CLIPModel` (float32, identical outputs).

    Args:
        src: an open_clip directory (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
            ``open_clip_pytorch_model.bin``: open_clip's hub layout, also what :func:`save_open_clip` writes), or a
            checkpoint file (safetensors, or a torch file; training checkpoints' ``state_dict`` wrapping is fine).
        model_name: for a file: an open_clip model name whose built-in config describes it (``ViT-B-32``,
            ``ViT-B-32-quickgelu``, ...). The ``-quickgelu`` names are the ones for OpenAI's weights.
        config: for a file: a JSON file with open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``), or a whole ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``).

    Raises:
        ModelFormatError: a missing or unreadable file, an unsupported option, or weights that do not match.
    """
    src = Path(src)
    preprocess: dict = {}
    quick_gelu = False
    if src.is_dir():
        if model_name is not None or config is not None:
            raise ModelFormatError(f"{src}: an open_clip directory carries its own config; drop model_name/config")
        dir_config = _read_dir_config(src)
        if dir_config is None:
            raise ModelFormatError(f"{src}: no {OPEN_CLIP_CONFIG_FILE} with a model_cfg (not an open_clip directory)")
        weights = next((src / n for n in WEIGHTS_FILES if (src / n).is_file()), None)
        if weights is None:
            raise ModelFormatError(f"{src}: no weights ({' or '.join(WEIGHTS_FILES)})")
        model_cfg, preprocess, where = (
            dir_config["model_cfg"],
            dir_config.get("preprocess_cfg") or {},
            src / OPEN_CLIP_CONFIG_FILE,
        )
    elif src.is_file():
        if model_name is None and config is None:
            # Shapes alone cannot tell QuickGELU from GELU, so the architecture is never guessed from the weights.
            raise ModelFormatError(
                f"{src}: an open_clip checkpoint file needs its model config: pass model_name (an open_clip model "
                "name such as ViT-B-32, or ViT-B-32-quickgelu for OpenAI's weights) or config (a JSON file)"
            )
        if model_name is not None and config is not None:
            raise ModelFormatError(f"{src}: give model_name or config, not both")
        weights = src
        if model_name is not None:
            model_cfg, where = builtin_model_config(model_name), f"open_clip model {model_name}"
            quick_gelu = model_name.endswith(QUICKGELU_SUFFIX)
        else:
            model_cfg, where = _read_json_config(Path(config)), config
            if "model_cfg" in model_cfg:  # a whole open_clip_config.json
                model_cfg, preprocess = model_cfg["model_cfg"], model_cfg.get("preprocess_cfg") or {}
    else:
        raise ModelFormatError(f"{src}: no such file or directory")
    cfg = config_from_open_clip(model_cfg, preprocess, quick_gelu=quick_gelu, source=str(where))
    state = to_vlkit_state_dict(read_checkpoint(weights), cfg, source=str(weights))
    model = create_model(cfg, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_open_clip(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a vlkit CLIP model as an open_clip directory, atomically; returns the directory.

    ``open_clip.create_model("local-dir:" + str(out_dir))`` loads it offline and gives the same embeddings.
    """
    config = open_clip_config(model)
    tensors = to_open_clip_state_dict(model)

    def write(tmp: Path) -> None:
        (tmp / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / OPEN_CLIP_WEIGHTS_FILE), metadata={"format": "pt"})

    atomic_write_dir(Path(out_dir), write)
    return Path(out_dir)
