"""Checks of a resolved config. Each problem names the keys involved; all problems are reported at once."""

from __future__ import annotations

import re

from vlkit.config.schema import Config, LLMConfig, ModelConfig, TextConfig, TransformerConfig, VisionConfig

ARCHS = ("clip", "vit_classifier", "llama", "neva")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "relu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
LOSS_IMPLS = ("auto", "naive", "tiled", "fused", "ring")
PRECISIONS = ("fp32", "bf16", "fp16")
DATA_PARALLEL = ("auto", "none", "ddp", "fsdp")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
DATA_KINDS = ("synthetic_shapes", "synthetic_shapes_vqa", "webdataset", "csv", "imagefolder", "llava")
CONV_TEMPLATES = ("plain", "vicuna_v1", "llama_2", "nvgpt", "llama_3")  # = vlkit.data.conversation.TEMPLATES
IMAGE_ASPECT_RATIOS = ("square", "pad", "keep")
# NeVA: mm_cfg.llm.model_type picks the conversation template (the data module's names, less stage 1's "plain").
LLM_MODEL_TYPES = ("nvgpt", "llama_2", "llama_3", "vicuna_v1")
PROJECTOR_TYPES = re.compile(r"linear|mlp([1-9][0-9]*)x_gelu")  # = vlkit.models.neva.build_projector
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _choice(problems: list[str], key: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(problems: list[str], key: str, value: object) -> None:
    if value is None or not isinstance(value, (int, float)) or value <= 0:
        problems.append(f"{key}={value!r} must be positive")


def _rate(problems: list[str], key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        problems.append(f"{key}={value} must be in [0, 1)")


def _check_tower(p: list[str], prefix: str, t: TransformerConfig, tp: int) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        _positive(p, f"{prefix}.{name}", getattr(t, name))
    if t.ffn_hidden_size is not None:
        _positive(p, f"{prefix}.ffn_hidden_size", t.ffn_hidden_size)
    if t.output_dim is not None:
        _positive(p, f"{prefix}.output_dim", t.output_dim)
    for name in ("hidden_dropout", "attention_dropout", "drop_path_rate"):
        _rate(p, f"{prefix}.{name}", getattr(t, name))
    _choice(p, f"{prefix}.activation", t.activation, ACTIVATIONS)
    _choice(p, f"{prefix}.normalization", t.normalization, NORMS)
    heads, hidden = t.num_attention_heads, t.hidden_size
    if heads > 0 and hidden > 0 and hidden % heads:
        p.append(f"{prefix}.hidden_size={hidden} is not divisible by {prefix}.num_attention_heads={heads}")
    kv_heads = getattr(t, "num_query_groups", None)
    if heads > 0 and kv_heads is not None and (kv_heads <= 0 or heads % kv_heads):
        p.append(f"{prefix}.num_attention_heads={heads} is not divisible by {prefix}.num_query_groups={kv_heads}")
    if tp > 1:
        counts = [(f"{prefix}.num_attention_heads", heads)]
        if kv_heads is not None:
            counts.append((f"{prefix}.num_query_groups", kv_heads))
        for key, n in counts:
            if n > 0 and n % tp:
                p.append(f"parallel.tensor_parallel_size={tp} does not divide {key}={n}")
        if t.ffn_size % tp:
            p.append(f"parallel.tensor_parallel_size={tp} does not divide {prefix}.ffn_hidden_size={t.ffn_size}")
    g = t.activations_checkpoint_granularity
    if g is not None:
        _choice(p, f"{prefix}.activations_checkpoint_granularity", g, ("full", "selective"))
        method = t.activations_checkpoint_method
        if method is not None:
            _choice(p, f"{prefix}.activations_checkpoint_method", method, ("block", "uniform"))
        n = t.activations_checkpoint_num_layers
        if n is not None and not 0 < n <= max(t.num_layers, 1):
            p.append(f"{prefix}.activations_checkpoint_num_layers={n} must be in 1..{prefix}.num_layers={t.num_layers}")
        if g == "full" and method is None:
            p.append(f"{prefix}.activations_checkpoint_granularity=full needs {prefix}.activations_checkpoint_method")


def _check_vision(p: list[str], v: VisionConfig, tp: int) -> None:
    _check_tower(p, "model.vision", v, tp)
    for name in ("patch_dim", "img_h", "img_w", "num_channels"):
        _positive(p, f"model.vision.{name}", getattr(v, name))
    if v.patch_dim > 0:
        for side in ("img_h", "img_w"):
            size = getattr(v, side)
            if size > 0 and size % v.patch_dim:
                p.append(f"model.vision.{side}={size} is not divisible by model.vision.patch_dim={v.patch_dim}")
    if v.class_token_length < 0:
        p.append(f"model.vision.class_token_length={v.class_token_length} must be >= 0")
    if v.class_token_length == 0 and not v.global_average_pool:
        p.append("model.vision.class_token_length=0 needs model.vision.global_average_pool=True (nothing to pool)")
    _rate(p, "model.vision.drop_patch_rate", v.drop_patch_rate)
    _choice(p, "model.vision.crop_style", v.crop_style, ("openai", "hf"))
    _choice(p, "model.vision.resize_interpolation", v.resize_interpolation, ("bicubic", "bilinear"))
    for key, val in (("image_mean", v.image_mean), ("image_std", v.image_std)):
        if val is not None and len(val) != v.num_channels:
            p.append(f"model.vision.{key} has {len(val)} values for model.vision.num_channels={v.num_channels}")
    if v.image_std is not None and any(s <= 0 for s in v.image_std):
        p.append(f"model.vision.image_std={list(v.image_std)} must be positive")
    if v.encoder_seq_length is not None and v.patch_dim > 0 and v.encoder_seq_length != v.num_patches:
        p.append(
            f"model.vision.encoder_seq_length={v.encoder_seq_length} does not match the patch grid of "
            f"img_h={v.img_h} x img_w={v.img_w} / patch_dim={v.patch_dim} ({v.num_patches} patches); "
            "set it to null to derive it"
        )


def _check_text(p: list[str], t: TextConfig, tp: int) -> None:
    _check_tower(p, "model.text", t, tp)
    _positive(p, "model.text.vocab_size", t.vocab_size)
    _positive(p, "model.text.encoder_seq_length", t.encoder_seq_length)
    _choice(p, "model.text.pooling", t.pooling, ("eot", "first"))
    if t.vocab_size > 0 and not 0 <= t.eot_token_id < t.vocab_size:
        p.append(f"model.text.eot_token_id={t.eot_token_id} is outside model.text.vocab_size={t.vocab_size}")


def _check_llm(p: list[str], t: LLMConfig, tp: int) -> None:
    _check_tower(p, "model.llm", t, tp)
    _positive(p, "model.llm.vocab_size", t.vocab_size)
    if t.hidden_size > 0 and t.num_attention_heads > 0 and t.head_dim % 2:
        p.append(f"model.llm head dim {t.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
    _positive(p, "model.llm.encoder_seq_length", t.encoder_seq_length)
    _positive(p, "model.llm.rotary_base", t.rotary_base)
    _choice(p, "model.llm.position_embedding_type", t.position_embedding_type, ("rope",))
    if t.ffn_dropout != 0.0:
        p.append(f"model.llm.ffn_dropout={t.ffn_dropout} is not implemented; use model.llm.hidden_dropout")
    if t.rope_scaling:
        kind = t.rope_scaling.get("type", t.rope_scaling.get("rope_type"))
        needed = {"linear": ("factor",), "llama3": LLAMA3_ROPE_KEYS}.get(kind)
        if needed is None:
            p.append(f"model.llm.rope_scaling type {kind!r} is not one of linear, llama3")
        elif missing := [k for k in needed if k not in t.rope_scaling]:
            p.append(f"model.llm.rope_scaling ({kind}) needs {', '.join(missing)}")
    ids = [("bos_token_id", t.bos_token_id), ("pad_token_id", t.pad_token_id)]
    ids += [("eos_token_ids", i) for i in t.eos_token_ids]
    for key, i in ids:
        if i is not None and t.vocab_size > 0 and not 0 <= i < t.vocab_size:
            p.append(f"model.llm.{key}={i} is outside model.llm.vocab_size={t.vocab_size}")


# model.peft.lora.target_modules: the projections of vlkit's blocks (= vlkit.nn.lora.LORA_TARGETS) by MLP kind, the
# towers each architecture can adapt (the first ones: where a bare name applies), and other libraries' names for them.
LORA_ATTENTION = ("qkv", "proj")
LORA_MLP = {True: ("gate", "up", "down"), False: ("fc1", "fc2")}  # SwiGLU or not
LORA_TOWERS = {"neva": (("llm",), ("vision_tower",)), "clip": (("visual", "text"), ())}
LORA_ALIASES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query_key_value": "qkv", "linear_qkv": "qkv",
                "in_proj": "qkv", "o_proj": "proj", "o": "proj", "out_proj": "proj", "dense": "proj",
                "linear_proj": "proj", "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate",
                "w3": "up", "w2": "down", "c_fc": "fc1", "c_proj": "fc2", "dense_h_to_4h": "fc1",
                "dense_4h_to_h": "fc2", "fc1": "gate", "fc2": "down", "gate": "fc1", "up": "fc1",
                "down": "fc2"}  # fmt: skip


def _lora_tower_names(m: ModelConfig, tower: str) -> tuple[str, ...]:
    cfg = {"llm": m.llm, "vision_tower": m.vision, "visual": m.vision, "text": m.text}[tower]
    return LORA_ATTENTION + LORA_MLP[cfg is not None and cfg.activation == "swiglu"]


def lora_targets(m: ModelConfig) -> list[str]:
    """``model.peft.lora.target_modules``, or when it is None every attention and MLP projection of the towers a bare
    name applies to (NeVA: its LLM; CLIP: both towers)."""
    lora = m.peft.lora
    if lora.target_modules is not None:
        return list(lora.target_modules)
    default = LORA_TOWERS.get(m.arch, (("llm",), ()))[0]
    return list(dict.fromkeys(n for tower in default for n in _lora_tower_names(m, tower)))


def _adapted_towers(m: ModelConfig) -> set[str]:
    default, _ = LORA_TOWERS[m.arch]
    return {t for target in lora_targets(m) for t in ((target.rpartition(".")[0],) if "." in target else default)}


def _check_lora(p: list[str], m: ModelConfig) -> None:
    """``model.peft.lora``: sizes, and every target a projection of its tower (with the nearest valid name)."""
    import difflib

    lora = m.peft.lora
    key = "model.peft.lora"
    if not isinstance(lora.rank, int) or lora.rank < 0:
        p.append(f"{key}.rank={lora.rank!r} must be an integer >= 0 (0: off)")
        return
    if lora.rank == 0:
        return
    if m.arch not in LORA_TOWERS:
        p.append(f"{key}: LoRA adapts model.arch=neva (its LLM and vision tower) or clip, not {m.arch!r}")
        return
    _positive(p, f"{key}.alpha", lora.alpha)
    _rate(p, f"{key}.dropout", lora.dropout)
    if lora.target_modules is not None and not lora.target_modules:
        p.append(f"{key}.target_modules is empty: name the projections to adapt ({', '.join(LORA_ATTENTION)}, ...)")
    default, others = LORA_TOWERS[m.arch]
    problems_before = len(p)
    for target in lora_targets(m):
        tower, _, name = str(target).rpartition(".")
        if tower and tower not in default + others:
            close = difflib.get_close_matches(tower, default + others, n=1, cutoff=0.0)
            p.append(f"{key}.target_modules: {target!r}: no tower {tower!r} in model.arch={m.arch}; did you mean "
                     f"'{close[0]}.{name}'? (towers: {', '.join(default + others)})")  # fmt: skip
            continue
        valid = sorted({n for t in ((tower,) if tower else default) for n in _lora_tower_names(m, t)})
        if name in valid and all(name in _lora_tower_names(m, t) for t in ((tower,) if tower else default)):
            continue
        close = [LORA_ALIASES[name]] if LORA_ALIASES.get(name) in valid else []
        close = close or difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
        where = tower or "/".join(default)
        nearest = f"{tower}.{close[0]}" if tower else close[0]
        p.append(f"{key}.target_modules: {target!r} is not a projection of {where}; did you mean {nearest!r}? "
                 f"(valid: {', '.join(valid)})")  # fmt: skip
    if m.arch == "clip" and len(p) == problems_before:  # the targets are valid: which towers they adapt is known
        # A lock's unlocked blocks would be frozen again by LoRA, and its eval mode would switch the adapters'
        # dropout off: one of the two decides what trains in a tower.
        for lock, tower in (("lock_image", "visual"), ("lock_text", "text")):
            if getattr(m, lock) and tower in _adapted_towers(m):
                p.append(f"{key} adapts {tower} and model.{lock}=true locks it: choose one (LoRA already freezes "
                         f"the base of the towers it adapts; to adapt only the other tower, name it in "
                         f"target_modules, e.g. [{'text' if tower == 'visual' else 'visual'}.qkv, ...])")  # fmt: skip


def _check_neva(p: list[str], m: ModelConfig) -> None:
    """``model.mm_cfg`` against the towers it wires together. Declarations that describe the vision tower (patch_dim,
    hidden_size, crop_size, the layer read) are checked against ``model.vision`` only when the tower is built from it;
    a pretrained tower is checked when it is loaded (vlkit.interop.neva)."""
    mm, v = m.mm_cfg, m.vision
    if mm is None:
        return
    if not PROJECTOR_TYPES.fullmatch(mm.mm_mlp_adapter_type):
        kind = mm.mm_mlp_adapter_type
        p.append(f"model.mm_cfg.mm_mlp_adapter_type={kind!r} is not one of linear, mlp2x_gelu, mlpNx_gelu (N >= 1)")
    _choice(p, "model.mm_cfg.llm.model_type", mm.llm.model_type, LLM_MODEL_TYPES)
    enc = mm.vision_encoder
    key = "model.mm_cfg.vision_encoder"
    if enc.class_token_length < 0:
        p.append(f"{key}.class_token_length={enc.class_token_length} must be >= 0")
    if enc.crop_size is not None and (len(enc.crop_size) != 2 or any(s <= 0 for s in enc.crop_size)):
        p.append(f"{key}.crop_size={list(enc.crop_size)} must be [height, width], both positive")
    if enc.from_pretrained:
        return
    declared = [("patch_dim", enc.patch_dim, v.patch_dim), ("hidden_size", enc.hidden_size, v.hidden_size)]
    if enc.crop_size is not None and len(enc.crop_size) == 2:
        declared.append(("crop_size", list(enc.crop_size), [v.img_h, v.img_w]))
    for name, said, has in declared:
        if said is not None and said != has:
            tower = "[model.vision.img_h, model.vision.img_w]" if name == "crop_size" else f"model.vision.{name}"
            p.append(f"{key}.{name}={said} disagrees with {tower}={has} (the tower built without from_pretrained)")
    if not -(v.num_layers + 1) <= enc.vision_select_layer <= v.num_layers:
        p.append(
            f"{key}.vision_select_layer={enc.vision_select_layer} is outside the {v.num_layers + 1} hidden states of "
            f"model.vision.num_layers={v.num_layers} (valid: {-(v.num_layers + 1)}..{v.num_layers})"
        )
    if enc.class_token_length > v.class_token_length:
        p.append(
            f"{key}.class_token_length={enc.class_token_length} drops more tokens than the tower's "
            f"model.vision.class_token_length={v.class_token_length} class tokens"
        )


def validate(cfg: Config) -> list[str]:
    """Every problem of a resolved config, each naming its keys. Empty when the config is usable."""
    p: list[str] = []
    m, tr, par = cfg.model, cfg.trainer, cfg.parallel
    tp = par.tensor_parallel_size
    _positive(p, "parallel.tensor_parallel_size", tp)
    tp = tp if isinstance(tp, int) and tp > 0 else 1
    _choice(p, "model.arch", m.arch, ARCHS)
    _choice(p, "model.loss_impl", m.loss_impl, LOSS_IMPLS)
    _positive(p, "model.output_dim", m.output_dim)
    _check_vision(p, m.vision, tp)
    if m.arch == "clip":
        if m.text is None:
            p.append("model.arch=clip needs a model.text section")
        else:
            _check_text(p, m.text, tp)
            if m.text.output_dim != m.vision.output_dim:
                p.append(
                    f"model.vision.output_dim={m.vision.output_dim} and model.text.output_dim={m.text.output_dim} "
                    "must be equal (one embedding space)"
                )
        if m.logit_scale_init > m.logit_scale_max:
            p.append(f"model.logit_scale_init={m.logit_scale_init} exceeds model.logit_scale_max={m.logit_scale_max}")
    if m.arch == "vit_classifier":
        _positive(p, "model.num_classes", m.num_classes)
        _choice(p, "model.vision_pretraining_type", m.vision_pretraining_type, ("classify",))
    if m.arch in ("llama", "neva") and m.llm is None:
        p.append(f"model.arch={m.arch} needs a model.llm section")
    if m.llm is not None:
        _check_llm(p, m.llm, tp)
    if m.mm_cfg is not None and m.arch != "neva":
        p.append(f"model.mm_cfg is NeVA's block; model.arch={m.arch!r} does not use it (set model.arch=neva)")
    if m.arch == "neva":
        _check_neva(p, m)
    if m.peft is not None:
        _check_lora(p, m)

    _choice(p, "trainer.precision", tr.precision, PRECISIONS)
    if tr.amp_O2 and tr.precision == "fp32":
        p.append("trainer.amp_O2=True (model.megatron_amp_O2) needs trainer.precision=bf16 or fp16")
    _positive(p, "trainer.micro_batch_size", tr.micro_batch_size)
    _positive(p, "trainer.max_steps", tr.max_steps)
    if tr.global_batch_size is not None:
        _positive(p, "trainer.global_batch_size", tr.global_batch_size)
        if tr.micro_batch_size > 0 and tr.global_batch_size % tr.micro_batch_size:
            p.append(
                f"trainer.global_batch_size={tr.global_batch_size} is not a multiple of "
                f"trainer.micro_batch_size={tr.micro_batch_size}"
            )
    if tr.gradient_clip_val is not None and tr.gradient_clip_val <= 0:
        p.append(f"trainer.gradient_clip_val={tr.gradient_clip_val} must be positive (or null to disable)")
    _positive(p, "trainer.num_nodes", tr.num_nodes)
    if tr.ema_decay is not None and not 0.0 <= tr.ema_decay < 1.0:
        p.append(f"trainer.ema_decay={tr.ema_decay} must be in [0, 1) (or null: off)")
    _choice(p, "trainer.accelerator", tr.accelerator, ("auto", "cpu", "cuda"))
    _choice(p, "parallel.data_parallel", par.data_parallel, DATA_PARALLEL)

    o = cfg.optim
    _choice(p, "optim.name", o.name, OPTIMIZERS)
    _positive(p, "optim.lr", o.lr)
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={list(o.betas)} must be two values in [0, 1)")
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        p.append(f"optim.layer_decay={o.layer_decay} must be in (0, 1]")
    _choice(p, "schedule.name", cfg.schedule.name, SCHEDULES)
    if cfg.schedule.warmup_steps < 0:
        p.append(f"schedule.warmup_steps={cfg.schedule.warmup_steps} must be >= 0")
    _choice(p, "data.kind", cfg.data.kind, DATA_KINDS)
    if cfg.data.num_workers < 0:
        p.append(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    for key in ("clip_crop_scale", "crop_scale"):
        scale = getattr(cfg.data, key)
        if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
            p.append(f"data.{key}={list(scale)} must be [min, max] with 0 < min <= max <= 1 (or null)")
    if cfg.data.conv_template is not None:
        _choice(p, "data.conv_template", cfg.data.conv_template, CONV_TEMPLATES)
    _choice(p, "data.image_aspect_ratio", cfg.data.image_aspect_ratio, IMAGE_ASPECT_RATIOS)
    return p
