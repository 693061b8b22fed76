"""NeMo CLIP checkpoints (``MegatronCLIPModel``, Megatron-core names) -> vlkit's CLIP.

The archive and rank files are read by :mod:`vlkit.interop.nemo`; this module merges the tensor-parallel shards of a
CLIP model and renames them. NeMo's own Hugging Face -> NeMo converter fixes the correspondence, so the tensors are
renamed to transformers' CLIPModel names and go through vlkit's Hugging Face mapping (:mod:`vlkit.interop.hf`), the
one tested against transformers:

==========================================================  =============================================
NeMo (``vision_encoder.`` / ``text_encoder.``)              transformers (``vision_model.`` / ``text_model.``)
==========================================================  =============================================
``conv1.weight``, ``class_token`` [1, 1, W]                 ``embeddings.patch_embedding.weight``, ``class_embedding``
``position_embeddings.weight``, ``ln_pre``                  ``embeddings.position_embedding.weight``, ``pre_layrnorm``
``embedding.word_embeddings`` / ``position_embeddings``     ``embeddings.token_embedding`` / ``position_embedding``
``decoder.layers.N.self_attention.linear_qkv``              ``encoder.layers.N.self_attn.{q,k,v}_proj``
``...linear_qkv.layer_norm_{weight,bias}``, ``linear_proj`` ``layer_norm1``, ``self_attn.out_proj``
``...mlp.linear_fc1.layer_norm_*``, ``linear_fc1/2``        ``layer_norm2``, ``mlp.fc1`` / ``fc2``
``final_layernorm`` (vision / text)                         ``post_layernorm`` / ``final_layer_norm``
``head.weight``                                             ``visual_projection`` / ``text_projection``
==========================================================  =============================================

The fused QKV rows are per head ``[q_h; k_h; v_h]`` (multi-head attention: one head per query group). Across
tensor-parallel ranks, QKV, ``linear_fc1`` and the word embeddings are split along rows, ``linear_proj`` and
``linear_fc2`` along columns. NeMo's legacy CLIP modules (``backbone.transformer.layers``, ``query_key_value``) are
refused: their QKV order differs between NeMo's own converters.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlkit.interop.files import ModelFormatError

# NeMo's activation names (utils_funcs.activation_to_func): "approx-gelu" is its ApproxGELUActivation,
# x * sigmoid(1.702 x), i.e. OpenAI CLIP's quick GELU (what NeMo's CLIP ViT-L/14 config uses); "gelu" is erf GELU.
_ACT = {"gelu": "gelu", "approx-gelu": "quick_gelu"}
_TOWERS = {"vision_encoder.": "vision_model.", "text_encoder.": "text_model."}
_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "layer_norm1.weight",
    "self_attention.linear_qkv.layer_norm_bias": "layer_norm1.bias",
    "self_attention.linear_proj.weight": "self_attn.out_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "layer_norm2.weight",
    "mlp.linear_fc1.layer_norm_bias": "layer_norm2.bias",
    # Megatron-core's local (non-Transformer-Engine) layers keep the norms as modules of their own.
    "input_layernorm.weight": "layer_norm1.weight",
    "input_layernorm.bias": "layer_norm1.bias",
    "pre_mlp_layernorm.weight": "layer_norm2.weight",
    "pre_mlp_layernorm.bias": "layer_norm2.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_TOP = {
    "vision_encoder.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "vision_encoder.class_token": "vision_model.embeddings.class_embedding",
    "vision_encoder.position_embeddings.weight": "vision_model.embeddings.position_embedding.weight",
    "vision_encoder.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "vision_encoder.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "vision_encoder.final_layernorm.weight": "vision_model.post_layernorm.weight",
    "vision_encoder.final_layernorm.bias": "vision_model.post_layernorm.bias",
    "vision_encoder.head.weight": "visual_projection.weight",
    "text_encoder.embedding.word_embeddings.weight": "text_model.embeddings.token_embedding.weight",
    "text_encoder.embedding.position_embeddings.weight": "text_model.embeddings.position_embedding.weight",
    "text_encoder.final_layernorm.weight": "text_model.final_layer_norm.weight",
    "text_encoder.final_layernorm.bias": "text_model.final_layer_norm.bias",
    "text_encoder.head.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_LAYER_KEY = re.compile(r"^(vision_encoder\.|text_encoder\.)decoder\.layers\.(\d+)\.(.+)$")
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias", "word_embeddings.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def _strip(key: str) -> str:
    for prefix in ("model.", "module."):
        key = key.removeprefix(prefix)
    return key.replace("decoder.final_layernorm.", "final_layernorm.")  # where the block's own final norm lives


def _merge(states: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """One CLIP state (NeMo names) from the tensor-parallel ranks' shards."""
    if len(states) == 1:
        return states[0]
    out = {}
    for key in states[0]:
        if any(key not in s for s in states):
            raise ModelFormatError(f"{where}: {key} is missing from some tensor-parallel ranks")
        parts = [s[key] for s in states]
        if key.endswith(_COLUMN):
            out[key] = torch.cat(parts, dim=0)
        elif key.endswith(_ROW):
            out[key] = torch.cat(parts, dim=1)
        else:
            out[key] = parts[0]
    return out


def _hf_config(config: dict, text_vocab: int, where: str) -> dict:
    """transformers' CLIPConfig (as a dict) for NeMo's ``vision`` / ``text`` / ``output_dim`` sections."""
    v, t = config.get("vision") or {}, config.get("text") or {}
    try:

        def tower(c: dict, name: str) -> dict:
            act = str(c.get("activation", "gelu"))
            if act not in _ACT:
                raise ModelFormatError(f"{where}: {name}.activation={act!r} has no vlkit equivalent "
                                       "(gelu, approx-gelu)")  # fmt: skip
            hidden_act = "gelu_pytorch_tanh" if c.get("openai_gelu") else _ACT[act]  # NeMo: openai_gelu wins
            return {
                "hidden_size": int(c["hidden_size"]),
                "intermediate_size": int(c["ffn_hidden_size"]),
                "num_hidden_layers": int(c["num_layers"]),
                "num_attention_heads": int(c["num_attention_heads"]),
                "hidden_act": hidden_act,
                "layer_norm_eps": float(c.get("layernorm_epsilon", 1e-5)),
                "attention_dropout": float(c.get("attention_dropout", 0.0)),
            }

        vision = {**tower(v, "vision"), "patch_size": int(v["patch_dim"]), "image_size": [int(v["img_h"]),
                  int(v["img_w"])], "num_channels": int(v.get("num_channels", 3))}  # fmt: skip
        text = {**tower(t, "text"), "max_position_embeddings": int(t.get("encoder_seq_length") or 77),
                "vocab_size": text_vocab, "eos_token_id": 49407 if text_vocab >= 49408 else text_vocab - 1}  # fmt: skip
        output_dim = int(config.get("output_dim") or v.get("output_dim"))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: not a NeMo CLIP model config (missing or bad {e})") from None
    if int(v.get("class_token_length", 1)) != 1:
        raise ModelFormatError(f"{where}: vision.class_token_length={v['class_token_length']}: only 1 is read")
    return {"model_type": "clip", "projection_dim": output_dim, "vision_config": vision, "text_config": text}


def _to_hf(state: dict[str, torch.Tensor], config: dict, where: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    heads = {"vision_encoder.": config["vision_config"]["num_attention_heads"],
             "text_encoder.": config["text_config"]["num_attention_heads"]}  # fmt: skip
    for key, t in state.items():
        if key in _TOP:
            out[_TOP[key]] = t.reshape(-1) if key.endswith("class_token") else t
            continue
        m = _LAYER_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        tower, i, rest = m.groups()
        base = f"{_TOWERS[tower]}encoder.layers.{i}."
        if rest in _LAYER:
            out[base + _LAYER[rest]] = t
        elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = t.reshape(heads[tower], 3, -1, *t.shape[1:]).unbind(1)  # per head [q_h; k_h; v_h]
            for name, x in zip("qkv", (q, k, v)):
                out[f"{base}self_attn.{name}_proj.{kind}"] = x.reshape(-1, *t.shape[1:]).contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise ModelFormatError(f"{where}: tensors of no known NeMo CLIP layout: {sorted(unknown)[:8]}")
    return out


def load_nemo_clip(config: dict, raw: tuple[str, Any], where: str, *, device: torch.device | str = "cpu"):
    """A vlkit CLIPModel from the merged tensors of a NeMo CLIP ``.nemo`` (see :func:`vlkit.interop.nemo.load_nemo`)."""
    from vlkit.interop.hf import _fit_logit_scale, hf_model_config, hf_to_vlkit_state
    from vlkit.models.clip import CLIPModel
    from vlkit.models.factory import resolve_model_config

    kind, data = raw
    if kind == "dist":
        state = {_strip(k): t for k, t in data.items()}
    else:
        if len({pp for pp, _ in data}) > 1:
            raise ModelFormatError(f"{where}: a pipeline-parallel CLIP checkpoint is not read (TP only)")
        tps = sorted(tp for _, tp in data)
        state = _merge([{_strip(k): t for k, t in data[(0, tp)][1].items()} for tp in tps], where)
    legacy = sorted(k for k in state if ".backbone." in k or "query_key_value" in k or ".language_model." in k)
    if legacy:
        raise ModelFormatError(
            f"{where}: tensors of no known NeMo CLIP layout: {legacy[:4]} (NeMo's legacy CLIP modules are not read: "
            "re-save the model with mcore_gpt: True)"
        )
    embed = state.get("text_encoder.embedding.word_embeddings.weight")
    if embed is None:
        raise ModelFormatError(f"{where}: a CLIP checkpoint without text_encoder.embedding.word_embeddings")
    hf_config = _hf_config(config, int(embed.shape[0]), f"{where}:model_config.yaml")
    hf_state = _to_hf(state, hf_config, where)
    cfg = hf_model_config(hf_config, None, f"{where}:model_config.yaml")
    mean, std = (config.get("vision") or {}).get("image_mean"), (config.get("vision") or {}).get("image_std")
    if mean and std:
        cfg["vision"].update(image_mean=[float(x) for x in mean], image_std=[float(x) for x in std])
    _fit_logit_scale(cfg, hf_state)
    model_cfg = resolve_model_config(cfg)
    with torch.device(device):
        model = CLIPModel(model_cfg)
    model.load_state_dict(hf_to_vlkit_state(hf_state, model_cfg, where), strict=True)
    return model
