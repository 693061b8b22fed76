"""The peers ``vlkit bench train`` times vlkit against: the same architecture built in open_clip, timm or transformers.

Each builder takes the vlkit model config and returns a :class:`vlkit.bench.systems.System` whose step is that library's
own training step (see ``vlkit.bench.train``'s docstring for what exactly runs).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.bench.common import package_version
from vlkit.bench.systems import System, count_step_flops
from vlkit.interop.open_clip import open_clip_config
from vlkit.utils.flops import count_parameters


def mlp_ratio(ffn: int, width: int) -> float:
    """The ratio open_clip and timm turn back into ``int(width * ratio)`` hidden units, landing on ``ffn`` exactly."""
    ratio = ffn / width
    return ratio if int(width * ratio) == ffn else (ffn + 0.5) / width


def openclip_config(model_cfg) -> tuple[dict[str, Any], list[str]]:
    """open_clip ``CLIP`` kwargs (embed_dim, vision_cfg, text_cfg, quick_gelu, ...) for a vlkit CLIP config, from
    ``vlkit.interop.open_clip``'s own export mapping, and the training-only settings open_clip's towers do not carry
    (empty when the two networks train the same).

    Raises:
        ModelFormatError: open_clip's CLIP cannot express the architecture at all (all reasons listed).
    """
    v, t = model_cfg.vision, model_cfg.text
    issues = []
    for name, c in (("vision", v), ("text", t)):
        if c.hidden_dropout or c.attention_dropout or c.drop_path_rate:
            issues.append(f"{name} dropout / drop path")
        if c.output_dim not in (None, model_cfg.output_dim):
            issues.append(f"{name} output_dim {c.output_dim} != {model_cfg.output_dim}")
    with warnings.catch_warnings():  # crop and tokenizer warnings concern exported checkpoints, not a random init
        warnings.simplefilter("ignore")
        kwargs = open_clip_config(model_cfg)["model_cfg"]
    return kwargs, issues


def openclip_named_match(kwargs: dict[str, Any]) -> str | None:
    """The built-in open_clip model whose config equals ``kwargs`` (so the peer is exactly what its users run)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    def norm(cfg: dict) -> tuple | None:
        try:
            return (
                cfg["embed_dim"],
                bool(cfg.get("quick_gelu", False)),
                CLIPVisionCfg(**cfg["vision_cfg"]),
                CLIPTextCfg(**cfg["text_cfg"]),
            )
        except (TypeError, KeyError):
            return None

    want = norm(kwargs)
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg and not cfg.get("custom_text") and "multimodal_cfg" not in cfg and norm(cfg) == want:
            return name
    return None


@contextlib.contextmanager
def _quiet_root_warnings():
    # open_clip logs "No pretrained weights loaded" on the root logger for every random-init model.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The anchors' optimizer: AdamW, fused on CUDA.
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)


def build_openclip(model_cfg, args, device: torch.device, compiled: bool, inputs: dict) -> System:
    import open_clip

    kwargs, issues = openclip_config(model_cfg)
    named = openclip_named_match(kwargs) if not issues else None
    with _quiet_root_warnings():
        if named:

            def make(dev):
                return open_clip.create_model(named, pretrained=None, output_dict=True, device=dev)

            source = f"open_clip {package_version('open_clip_torch')} create_model({named!r})"
        else:

            def make(dev):
                return open_clip.create_model("ViT-B-16", pretrained=None, output_dict=True, device=dev, **kwargs)

            source = f"open_clip {package_version('open_clip_torch')} create_model with the preset's config {kwargs}"
        with torch.device("meta"):
            meta = make("meta")
        params, flops = count_parameters(meta), count_step_flops(meta, "clip", inputs)
        del meta
        model = make(device)
    model.train()
    opt = _adamw(model, device)
    loss_fn = open_clip.ClipLoss()
    fwd = torch.compile(model) if compiled else model
    peer_precision = "fp32" if args.precision == "fp32" else "bf16"
    img, ids = inputs["image"], inputs["text"]
    max_scale = float(model_cfg.logit_scale_max)

    def step():
        with _autocast(device, peer_precision):
            out = fwd(img, ids)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # open_clip's training loop clamps after every step
            model.logit_scale.clamp_(0, max_scale)

    notes = [f"architecture differs: {'; '.join(issues)}"] if issues else []
    if args.precision == "O2":
        notes.append("peer runs bf16 autocast (O2 is vlkit's FSDP mixed precision)")
    return System(
        source=source + (" + torch.compile(model)" if compiled else ""),
        step=step,
        precision=peer_precision,
        params=params,
        flops_per_step=flops,
        notes=notes,
        extra={"architecture_issues": issues, "open_clip_model": named or kwargs},
    )


TIMM_BASE = {"patch_size": 16, "img_size": 224, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}


def timm_config(model_cfg) -> tuple[dict[str, Any], list[str]]:
    """timm ``VisionTransformer`` kwargs for a vlkit ViT-classifier config, and what timm cannot express."""
    v = model_cfg.vision
    issues = []
    if v.normalization != "layernorm":
        issues.append(f"normalization {v.normalization}")
    if v.patch_bias == v.pre_norm:  # timm: a patch-embedding bias exactly when there is no pre-norm
        issues.append(f"patch_bias={v.patch_bias} with pre_norm={v.pre_norm} (timm ties bias = not pre_norm)")
    if v.drop_patch_rate:
        issues.append("patch dropout")
    acts = {"gelu": None, "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_tanh", "relu": "relu"}
    if v.activation not in acts:
        issues.append(f"activation {v.activation}")
    kwargs: dict[str, Any] = {
        "img_size": v.img_h if v.img_h == v.img_w else (v.img_h, v.img_w),
        "patch_size": v.patch_dim,
        "in_chans": v.num_channels,
        "num_classes": model_cfg.num_classes,
        "embed_dim": v.hidden_size,
        "depth": v.num_layers,
        "num_heads": v.num_attention_heads,
        "mlp_ratio": mlp_ratio(v.ffn_size, v.hidden_size),
        "qkv_bias": v.bias,
        "proj_bias": v.bias,
        "class_token": v.class_token_length > 0,
        # vlkit's extra class tokens are what timm calls register tokens: same sequence, same position table.
        "reg_tokens": max(v.class_token_length - 1, 0),
        "pre_norm": v.pre_norm,
        "global_pool": "avg" if v.global_average_pool else "token",
        "fc_norm": False,
        "drop_rate": v.hidden_dropout,
        "proj_drop_rate": v.hidden_dropout,
        "attn_drop_rate": v.attention_dropout,
        "drop_path_rate": v.drop_path_rate,
    }
    if acts.get(v.activation):
        kwargs["act_layer"] = acts[v.activation]
    return kwargs, issues


# Values that change nothing when an older timm lacks the argument (the GPU machines carry their own timm).
TIMM_NEUTRAL = {
    "qkv_bias": True,
    "proj_bias": True,
    "class_token": True,
    "reg_tokens": 0,
    "pre_norm": False,
    "fc_norm": False,
    "drop_rate": 0.0,
    "proj_drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0,
}


def supported_kwargs(cls, kwargs: dict, neutral: dict) -> tuple[dict, dict]:
    """``kwargs`` less those ``cls`` does not accept; returns (kept, dropped-and-not-neutral)."""
    import inspect

    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs, {}
    kept = {k: v for k, v in kwargs.items() if k in params}
    dropped = {k: v for k, v in kwargs.items() if k not in params and (k not in neutral or neutral[k] != v)}
    return kept, dropped


def build_timm(model_cfg, args, device: torch.device, compiled: bool, inputs: dict) -> System:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs, issues = timm_config(model_cfg)
    kwargs, dropped = supported_kwargs(VisionTransformer, kwargs, TIMM_NEUTRAL)
    issues += [f"this timm has no {k}={val!r}" for k, val in dropped.items()]
    named = all(kwargs[k] == val for k, val in TIMM_BASE.items())
    extra_kwargs = {k: val for k, val in kwargs.items() if k not in TIMM_BASE}

    def make():
        if named:
            return timm.create_model("vit_base_patch16_224", pretrained=False, **extra_kwargs)
        return VisionTransformer(**kwargs)

    with torch.device("meta"):
        meta = make()
    params, flops = count_parameters(meta), count_step_flops(meta, "vit_classifier", inputs)
    del meta
    model = make().to(device).train()
    opt = _adamw(model, device)
    fwd = torch.compile(model) if compiled else model
    peer_precision = "fp32" if args.precision == "fp32" else "bf16"
    img, labels = inputs["image"], inputs["label"]

    def step():
        with _autocast(device, peer_precision):
            loss = F.cross_entropy(fwd(img), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    shown = ", ".join(f"{k}={val!r}" for k, val in (extra_kwargs if named else kwargs).items())
    what = f"create_model('vit_base_patch16_224', {shown})" if named else f"VisionTransformer({shown})"
    notes = [f"architecture differs: {'; '.join(issues)}"] if issues else []
    if args.precision == "O2":
        notes.append("peer runs bf16 autocast (O2 is vlkit's FSDP mixed precision)")
    return System(
        source=f"timm {package_version('timm')} {what}" + (" + torch.compile(model)" if compiled else ""),
        step=step,
        precision=peer_precision,
        params=params,
        flops_per_step=flops,
        notes=notes,
        extra={"architecture_issues": issues, "timm_kwargs": kwargs},
    )


def build_transformers(model_cfg, args, device: torch.device, compiled: bool, inputs: dict) -> System:
    """transformers' LlamaForCausalLM with the preset's config, as the anchors ran it: pure bf16 weights (no
    autocast, no fp32 master copy), SDPA attention, ``labels=ids`` loss, fused AdamW."""
    import transformers

    from vlkit.interop.hf_llama import hf_config_from_llm

    config = transformers.LlamaConfig(**hf_config_from_llm(model_cfg.llm))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    params, flops = count_parameters(meta), count_step_flops(meta, "llama", inputs)
    del meta
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    opt = _adamw(model, device)
    fwd = torch.compile(model) if compiled else model
    ids = inputs["input_ids"]

    def step():
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    notes = ["peer runs pure bf16 weights (the anchors' setting)"] if dtype == torch.bfloat16 else []
    return System(
        source=f"transformers {package_version('transformers')} LlamaForCausalLM, {str(dtype).removeprefix('torch.')} "
        "weights, sdpa" + (" + torch.compile(model)" if compiled else ""),
        step=step,
        precision="pure bf16" if dtype == torch.bfloat16 else "fp32",
        params=params,
        flops_per_step=flops,
        notes=notes,
    )


PEER_BUILDERS = {"open_clip": build_openclip, "timm": build_timm, "transformers": build_transformers}
PEER_MODULES = {"open_clip": "open_clip", "timm": "timm", "transformers": "transformers"}
