"""Hugging Face ``LlavaForConditionalGeneration`` directories -> vlkit's NeVA (``model.arch=neva``), with parity.

A LLaVA directory is ``config.json`` (``model_type: llava``: a CLIP ``vision_config``, a LLaMA ``text_config``,
``vision_feature_layer``, ``vision_feature_select_strategy``, ``projector_hidden_act``, ``image_token_index``),
safetensors weights and usually the tokenizer and a ``CLIPImageProcessor`` config. It is the same network as NeVA:

* the vision tower is read at ``hidden_states[vision_feature_layer]`` (vlkit's ``vision_select_layer``, the same
  index); strategy ``default`` drops the class token (``class_token_length: 1``), ``full`` keeps it (0). Blocks after
  that layer and the post-norm are never run, so they are not kept;
* the projector ``linear_1 -> gelu -> linear_2`` is ``mm_mlp_adapter_type: mlp2x_gelu``;
* the language model is a LLaMA (see :mod:`vlkit.interop.hf_llama`).

Image tokens: a Hugging Face prompt holds ``image_seq_length`` copies of ``image_token_index`` per image (the
processor expands ``<image>``; prompts written before that hold one); vlkit's holds one ``IMAGE_TOKEN_INDEX`` (-200)
that the model expands. :func:`hf_ids_to_vlkit` and :func:`vlkit_ids_to_hf` map one to the other.

Weight names: transformers 5 keeps ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*`` and ``lm_head.*`` in memory and writes the 4.x names (``vision_tower.vision_model.*``
or ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``); all
are read.
Export back to Hugging Face is not provided: the blocks after the selected layer are not kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from vlkit.config.schema import MMConfig, MMLLMConfig, MMVisionEncoderConfig, ModelConfig, VisionConfig
from vlkit.interop.files import (
    CONFIG_FILE,
    ModelFormatError,
    read_json,
    save_converted,
)
from vlkit.models.factory import create_model, resolve_model_config
from vlkit.models.neva import IMAGE_TOKEN_INDEX, NevaModel, freeze

HF_ARCH = "LlavaForConditionalGeneration"
# transformers' LlamaConfig defaults: older LLaVA configs store only the text settings that differ from them.
_TEXT_DEFAULTS = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
# LlavaConfig's vision tower when config.json has none: CLIP ViT-L/14 at 336 px (LLaVA-1.5's).
_VISION_DEFAULTS = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
    "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
}  # fmt: skip
STRATEGY_DROP = {"default": 1, "full": 0}  # vision_feature_select_strategy -> class_token_length
# Tokenizer and chat files copied next to the converted weights (so the directory is self-contained).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
)  # fmt: skip
_VISION_KEY = re.compile(r"(embeddings\.|pre_layrnorm\.|post_layernorm\.|encoder\.layers\.(\d+)\.)")


def is_hf_llava_config(config: dict) -> bool:
    """Whether a config.json describes a transformers LlavaForConditionalGeneration."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "llava" or (isinstance(archs, list) and HF_ARCH in archs)


# ----------------------------------------------------------------------------------------------------------- config
def neva_config_from_hf(config: dict, preprocessor: dict | None = None, where: str = CONFIG_FILE) -> ModelConfig:
    """vlkit's model config for a LLaVA config.json (as a dict); what vlkit cannot represent raises, named."""
    from vlkit.interop.hf import hf_vision_section
    from vlkit.interop.hf_llama import llm_config_from_hf

    if not is_hf_llava_config(config):
        raise ModelFormatError(
            f"{where}: not a Hugging Face LLaVA config (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r})"
        )
    vision = dict(config.get("vision_config") or _VISION_DEFAULTS)
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ModelFormatError(f"{where}: vision_config.model_type={vision['model_type']!r}: only CLIP towers")
    text = {**_TEXT_DEFAULTS, **{k: v for k, v in (config.get("text_config") or {}).items() if v is not None}}
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ModelFormatError(f"{where}: vision_feature_layer={layer!r}: one layer only (not a list)")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGY_DROP:
        raise ModelFormatError(f"{where}: vision_feature_select_strategy={strategy!r} is not default or full")
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ModelFormatError(f"{where}: projector_hidden_act={act!r}: vlkit's projector uses gelu")
    if not config.get("multimodal_projector_bias", True):
        raise ModelFormatError(f"{where}: multimodal_projector_bias=false: vlkit's projector has biases")
    llm = llm_config_from_hf(text, f"{where}: text_config")
    if config.get("tie_word_embeddings"):  # LlavaConfig's own flag ties too
        llm = replace(llm, share_embeddings_and_output_weights=True)
    return resolve_model_config(
        ModelConfig(
            arch="neva",
            vision=VisionConfig(**hf_vision_section(vision, preprocessor, where)),
            llm=llm,
            mm_cfg=MMConfig(
                # LLaVA-1.5, the checkpoints this class was written for, is Vicuna: its conversation template.
                llm=MMLLMConfig(model_type="vicuna_v1"),
                vision_encoder=MMVisionEncoderConfig(
                    vision_select_layer=layer, class_token_length=STRATEGY_DROP[strategy]
                ),
                mm_mlp_adapter_type="mlp2x_gelu",
            ),
        )
    )


# ------------------------------------------------------------------------------------------------------ state dicts
def split_llava_state(
    hf_state: dict[str, torch.Tensor], where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(vision tower, projector, LlamaForCausalLM) tensors of a LLaVA state dict under either naming (module
    docstring): vision keys relative to the CLIP vision model (``embeddings.*``, ``encoder.layers.*``, ...),
    projector keys relative to it (``linear_1.weight``, ...), language-model keys as ``model.*`` / ``lm_head.*``."""
    vision, projector, text, unknown = {}, {}, {}, []
    for key, t in hf_state.items():
        k = key
        if k.startswith("model.") and k[6:].startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
            k = k[6:]  # transformers 5 in memory
        if k.startswith("vision_tower."):
            vision[k.removeprefix("vision_tower.").removeprefix("vision_model.")] = t
        elif k.startswith("multi_modal_projector."):
            projector[k.removeprefix("multi_modal_projector.")] = t
        elif k.startswith("language_model."):
            rest = k.removeprefix("language_model.")
            text[rest if rest.startswith(("model.", "lm_head.")) else "model." + rest] = t
        elif k.startswith("lm_head."):
            text[k] = t
        else:
            unknown.append(key)
    if unknown:
        raise ModelFormatError(f"{where}: tensors that are not LLaVA's: {sorted(unknown)[:6]}")
    return vision, projector, text


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "checkpoint") -> dict:
    """The whole :class:`NevaModel` state dict (its vision tower cut after the selected layer) from a LLaVA state
    dict. Every tensor is accounted for: missing, unknown or misshapen ones raise, named."""
    from vlkit.interop.hf import hf_to_vlkit_state
    from vlkit.interop.hf_llama import state_dict_from_hf as llama_state_dict_from_hf
    from vlkit.models.neva import hidden_state_index

    vision, projector, text = split_llava_state(hf_state, where)
    v = cfg.vision
    strange = [
        k for k in vision
        if not k.endswith("position_ids")
        and ((m := _VISION_KEY.match(k)) is None or (m.group(2) is not None and int(m.group(2)) >= v.num_layers))
    ]  # fmt: skip
    if strange:
        raise ModelFormatError(f"{where}: vision tower tensors its config does not explain: {sorted(strange)[:6]}")
    tower_cfg = ModelConfig(arch="vit_classifier", vision=v)
    full = {k.removeprefix("visual."): t for k, t in hf_to_vlkit_state(vision, tower_cfg, where, "").items()}
    keep = hidden_state_index(cfg.mm_cfg.vision_encoder.vision_select_layer, v.num_layers)
    state = {}
    for k, t in full.items():
        block = re.match(r"transformer\.blocks\.(\d+)\.", k)
        if k.startswith("norm.") or (block and int(block.group(1)) >= keep):
            continue  # after the selected layer: never run
        state[f"vision_tower.tower.{k}"] = t
    names = {"linear_1.weight": "projector.0.weight", "linear_1.bias": "projector.0.bias",
             "linear_2.weight": "projector.2.weight", "linear_2.bias": "projector.2.bias"}  # fmt: skip
    if sorted(projector) != sorted(names):
        raise ModelFormatError(
            f"{where}: the projector holds {sorted(projector)}; expected {sorted(names)} (gelu MLP with biases)"
        )
    state.update({names[k]: t for k, t in projector.items()})
    state.update({f"llm.{k}": t for k, t in llama_state_dict_from_hf(text, cfg.llm, where).items()})
    return state


# ------------------------------------------------------------------------------------------------------------ files
def load_hf_llava(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> NevaModel:
    """A vlkit :class:`NevaModel` from a Hugging Face LlavaForConditionalGeneration directory (safetensors), weights
    in their stored dtype (or ``dtype``). Built on the meta device and given the tensors as they are.

    Raises:
        ModelFormatError: not a LLaVA vlkit can represent, or weights that do not match its config.
    """
    from vlkit.interop.files import assign_state_dict
    from vlkit.interop.hf import PREPROCESSOR_FILE
    from vlkit.interop.hf_llama import check_shapes, read_safetensors_dir

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} (expected a Hugging Face LlavaForConditionalGeneration)")
    pre = path / PREPROCESSOR_FILE
    cfg = neva_config_from_hf(read_json(config_file), read_json(pre) if pre.is_file() else None, str(config_file))
    state = state_dict_from_hf(read_safetensors_dir(path), cfg, str(path))
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
    model = create_model(cfg, device="meta")
    check_shapes(model, state, str(path))
    assign_state_dict(model, state, device)
    freeze(model)
    return model


def convert_llava_to_vlkit(src: str | Path, out: str | Path) -> NevaModel:
    """Write a LLaVA directory as a vlkit model directory (config, weights, tokenizer and processor files),
    atomically; :func:`vlkit.load_model` reads it back as a :class:`NevaModel`. Returns the converted model."""
    src, out = Path(src), Path(out)
    model = load_hf_llava(src)
    config = read_json(src / CONFIG_FILE)
    files = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    source = {"format": "llava", "path": str(src), "image_token_index": config.get("image_token_index"),
              "image_seq_length": config.get("image_seq_length")}  # fmt: skip
    save_converted(model, out, src, files, source)
    return model


# -------------------------------------------------------------------------------------------------------- image ids
def hf_ids_to_vlkit(ids: Sequence[int], image_token_index: int, image_seq_length: int) -> list[int]:
    """A Hugging Face LLaVA prompt's ids with vlkit's placeholders: each run of ``image_token_index`` (k images x
    ``image_seq_length`` ids, or a single unexpanded one) becomes k (or one) ``IMAGE_TOKEN_INDEX``.

    Raises:
        ValueError: a run whose length is not a multiple of ``image_seq_length`` (nor 1).
    """
    out: list[int] = []
    run = 0
    for i in [*list(ids), None]:
        if i == image_token_index:
            run += 1
            continue
        if run:
            if run != 1 and run % image_seq_length:
                raise ValueError(
                    f"a run of {run} image tokens ({image_token_index}) is not a multiple of image_seq_length="
                    f"{image_seq_length}"
                )
            out += [IMAGE_TOKEN_INDEX] * max(1, run // image_seq_length)
            run = 0
        if i is not None:
            out.append(int(i))
    return out


def vlkit_ids_to_hf(ids: Sequence[int], image_token_index: int, image_seq_length: int) -> list[int]:
    """vlkit ids with placeholders -> a Hugging Face LLaVA prompt (each placeholder expanded, as its processor does)."""
    out: list[int] = []
    for i in ids:
        out += [image_token_index] * image_seq_length if i == IMAGE_TOKEN_INDEX else [int(i)]
    return out
