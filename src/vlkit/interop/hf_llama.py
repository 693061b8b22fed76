"""Hugging Face ``LlamaForCausalLM`` directories <-> vlkit's llama (``model.arch=llama``), with exact parity.

A Hugging Face directory holds ``config.json`` and safetensors weights, in one ``model.safetensors`` or in shards
listed by ``model.safetensors.index.json``. Both RoPE implementations rotate halves (x_i pairs with x_{i+d/2}) on the
weights as stored, so q/k need no permutation; the only re-layout is the fused QKV projection: Hugging Face keeps
``q_proj`` / ``k_proj`` / ``v_proj`` apart, vlkit stores them fused per key/value group ``[q of the group, k, v]``
(see :class:`vlkit.nn.Attention`). Every tensor is accounted for: a missing or unknown key is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlkit.config.schema import LLMConfig, ModelConfig
from vlkit.interop.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFormatError,
    assign_state_dict,
    atomic_write_dir,
    check_before_loading,
    declared_tensors,
    dtype_name,
)
from vlkit.models.factory import create_model
from vlkit.models.llama import LlamaDecoder, LlamaForCausalLM
from vlkit.nn.attention import fuse_qkv, unfuse_qkv

INDEX_FILE = "model.safetensors.index.json"
HF_ARCH = "LlamaForCausalLM"
ROPE_TYPES = ("default", "linear", "llama3")
# Keys some checkpoints carry that hold no weights (older transformers saved the RoPE buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_llama_config(config: dict) -> bool:
    """Whether a config.json describes a Hugging Face LLaMA causal LM."""
    return config.get("model_type") == "llama" or HF_ARCH in (config.get("architectures") or [])


# ----------------------------------------------------------------------------------------------------------- config
def _rope_settings(hf: dict, where: str) -> tuple[float, dict | None]:
    """(theta, vlkit rope_scaling) from either transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` +
    ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelFormatError(f"{where}: RoPE type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **params}


def llm_config_from_hf(hf: dict, where: str = CONFIG_FILE) -> LLMConfig:
    """vlkit's :class:`LLMConfig` for a Hugging Face LLaMA config.json (as a dict); unsupported options raise."""
    if not is_hf_llama_config(hf):
        raise ModelFormatError(
            f"{where}: not a Hugging Face LLaMA config (model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r})"
        )
    try:
        width, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        layers, ffn, vocab = int(hf["num_hidden_layers"]), int(hf["intermediate_size"]), int(hf["vocab_size"])
    except KeyError as e:
        raise ModelFormatError(f"{where}: missing required key {e.args[0]!r}") from None
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != width:
        raise ModelFormatError(f"{where}: head_dim={head_dim} x {heads} heads != hidden_size={width} (not supported)")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ModelFormatError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported")
    theta, scaling = _rope_settings(hf, where)
    eos = hf.get("eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return LLMConfig(
        num_layers=layers,
        hidden_size=width,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=vocab,
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        encoder_seq_length=int(hf.get("max_position_embeddings", 2048)),
        rotary_base=theta,
        rope_scaling=scaling,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        bias=attn_bias,
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
    )


def hf_config_from_llm(cfg: LLMConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json for transformers' LlamaForCausalLM (the 4.x layout, which 5.x reads too)."""
    if cfg.activation != "swiglu" or cfg.normalization != "rmsnorm" or cfg.position_embedding_type != "rope":
        raise ValueError(
            f"only LLaMA's SwiGLU / RMSNorm / RoPE export to Hugging Face (model.llm has activation={cfg.activation}, "
            f"normalization={cfg.normalization}, position_embedding_type={cfg.position_embedding_type})"
        )
    scaling = None
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": [HF_ARCH],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.layernorm_epsilon,
        "max_position_embeddings": cfg.max_position_embeddings or cfg.encoder_seq_length,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------------------------ state dicts
def _layer_pairs(cfg: LLMConfig, i: int) -> list[tuple[str, str]]:
    """(vlkit key, Hugging Face key) of the tensors mapped one to one in block i."""
    v, h = f"transformer.blocks.{i}", f"model.layers.{i}"
    pairs = [
        (f"{v}.norm1.weight", f"{h}.input_layernorm.weight"),
        (f"{v}.norm2.weight", f"{h}.post_attention_layernorm.weight"),
    ]
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for p in params:
        pairs += [
            (f"{v}.attn.proj.{p}", f"{h}.self_attn.o_proj.{p}"),
            (f"{v}.mlp.gate.{p}", f"{h}.mlp.gate_proj.{p}"),
            (f"{v}.mlp.up.{p}", f"{h}.mlp.up_proj.{p}"),
            (f"{v}.mlp.down.{p}", f"{h}.mlp.down_proj.{p}"),
        ]
    return pairs


def _qkv_keys(cfg: LLMConfig, i: int) -> list[tuple[str, tuple[str, str, str]]]:
    params = ("weight", "bias") if cfg.bias else ("weight",)
    h = f"model.layers.{i}.self_attn"
    return [
        (f"transformer.blocks.{i}.attn.qkv.{p}", (f"{h}.q_proj.{p}", f"{h}.k_proj.{p}", f"{h}.v_proj.{p}"))
        for p in params
    ]


def _few(keys) -> str:
    keys = sorted(keys)
    return str(keys[:8])[:-1] + (f", ... {len(keys) - 8} more]" if len(keys) > 8 else "]")


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: LLMConfig, where: str = "checkpoint") -> dict:
    """:class:`LlamaDecoder` state dict (keys without the ``llm.`` prefix) from a LlamaForCausalLM state dict.

    Raises:
        ModelFormatError: a tensor is missing, left over or of the wrong shape; the message lists them.
    """
    remaining = {k: t for k, t in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        t = remaining.pop(key, None)
        if t is None:
            missing.append(key)
        return t

    kv = cfg.num_query_groups or cfg.num_attention_heads
    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    head = remaining.pop("lm_head.weight", None)
    if cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = out["embed.weight"]  # tied: Hugging Face ignores a stored head as well
    elif head is None:
        missing.append("lm_head.weight")
    else:
        out["lm_head.weight"] = head
    for i in range(cfg.num_layers):
        for ours, theirs in _layer_pairs(cfg, i):
            out[ours] = take(theirs)
        for ours, (q, k, v) in _qkv_keys(cfg, i):
            parts = [take(key) for key in (q, k, v)]
            if all(p is not None for p in parts):
                out[ours] = fuse_qkv(*parts, cfg.num_attention_heads, kv)
    if missing or remaining:
        raise ModelFormatError(
            f"{where}: weights do not match its LLaMA config ({cfg.num_layers} layers, bias={cfg.bias}, "
            f"tied={cfg.share_embeddings_and_output_weights}): missing {_few(missing)}, unexpected {_few(remaining)}"
        )
    return out


def check_shapes(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of ``state`` has the shape ``model`` (built from the checkpoint's config) expects."""
    expected = model.state_dict()
    wrong = [
        f"{k}: {tuple(t.shape)} (config wants {tuple(expected[k].shape)})"
        for k, t in state.items()
        if tuple(t.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ModelFormatError(f"{where}: tensor shapes do not match its config: {'; '.join(wrong[:6])}")


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict from a :class:`LlamaDecoder` state dict (no ``lm_head.weight`` when tied)."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["lm_head.weight"]
    kv = cfg.num_query_groups or cfg.num_attention_heads
    for i in range(cfg.num_layers):
        for ours, theirs in _layer_pairs(cfg, i):
            out[theirs] = state[ours]
        for ours, names in _qkv_keys(cfg, i):
            for name, t in zip(names, unfuse_qkv(state[ours], cfg.num_attention_heads, kv)):
                out[name] = t
    return {k: t.detach().contiguous() for k, t in out.items()}


# ------------------------------------------------------------------------------------------------------------ files
def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} (expected a Hugging Face LlamaForCausalLM directory)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{file}: expected a JSON object")
    return config


def read_safetensors_dir(path: str | Path, declared_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory: ``model.safetensors``, or the shards its index lists.
    ``declared_only``: meta tensors of the shapes and dtypes the headers declare (nothing read or allocated)."""
    path = Path(path)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{index_file}: not a safetensors index with a weight_map ({e!r})") from None
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
    elif (path / WEIGHTS_FILE).is_file():
        files = {WEIGHTS_FILE: None}
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10])
        raise ModelFormatError(
            f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (found: {found}); only safetensors weights are read"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, keys in files.items():
        shard = path / name
        if not shard.is_file():
            raise ModelFormatError(f"{index_file}: lists {name}, which is missing from {path}")
        declared = declared_tensors(shard)  # the header, bounded and checked: a damaged shard is named
        absent = [k for k in keys or [] if k not in declared]
        if absent:
            raise ModelFormatError(f"{shard}: lacks {absent[:5]}, which {INDEX_FILE} places there")
        if declared_only:
            tensors.update((key, declared[key]) for key in (keys if keys is not None else declared))
            continue
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in keys if keys is not None else declared:
                tensors[key] = f.get_tensor(key)
    return tensors


def load_hf_llama(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LlamaForCausalLM:
    """A vlkit ``LlamaForCausalLM`` from a Hugging Face LlamaForCausalLM directory, weights in their stored dtype
    (or ``dtype``).

    Raises:
        ModelFormatError: the directory is not a LLaMA checkpoint vlkit can represent, or its weights do not match
            its config.
    """
    path = Path(path)
    config = read_hf_config(path)
    cfg = llm_config_from_hf(config, str(path / CONFIG_FILE))
    # Shapes and size against config.json from the headers, before anything is read or allocated.
    declared = read_safetensors_dir(path, declared_only=True)
    stored = {f"llm.{k}": tuple(t.shape) for k, t in state_dict_from_hf(declared, cfg, str(path)).items()}
    stored_dtype = (
        dtype_name(declared) if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    )
    model = check_before_loading(lambda: create_model(ModelConfig(arch="llama", llm=cfg)), stored,
                                 path / CONFIG_FILE, config, device=device, dtype=stored_dtype)  # fmt: skip
    state = state_dict_from_hf(read_safetensors_dir(path), cfg, str(path))
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
    check_shapes(model.llm, state, str(path))  # the meta model check_before_loading built
    assign_state_dict(model, {f"llm.{k}": t for k, t in state.items()}, device)
    return model


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most ``max_bytes`` each (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def save_hf_llama(
    model: LlamaForCausalLM | LlamaDecoder, path: str | Path, *, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write a Hugging Face LlamaForCausalLM directory (config.json + safetensors, sharded with an index above
    ``max_shard_bytes``) that ``transformers.LlamaForCausalLM.from_pretrained`` loads. Atomic, like every vlkit save.
    """
    model = getattr(model, "_orig_mod", model)
    decoder = model.llm if isinstance(model, LlamaForCausalLM) else model
    if not isinstance(decoder, LlamaDecoder):
        raise TypeError(f"expected a vlkit LlamaForCausalLM or LlamaDecoder, got {type(model).__name__}")
    cfg = decoder.config
    state = {k.replace("_orig_mod.", ""): t for k, t in decoder.state_dict().items()}
    tensors = {k: t.cpu() for k, t in state_dict_to_hf(state, cfg).items()}
    config = hf_config_from_llm(cfg, decoder.embed.weight.dtype)
    shards = _shards(tensors, max_shard_bytes)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    atomic_write_dir(Path(path), write)
    return Path(path)
