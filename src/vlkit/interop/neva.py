"""A NeVA model from pretrained parts: what ``model.mm_cfg`` names (the I/O the model itself never does).

* ``mm_cfg.vision_encoder.from_pretrained``: a Hugging Face CLIP, open_clip or vlkit directory (recognised by
  content), or a Hub id found in ``$VLKIT_MODELS`` or the local Hugging Face cache (see :mod:`vlkit.interop.hub`).
  Its architecture and preprocessing replace ``model.vision``; ``crop_size`` resizes it, ``patch_dim`` /
  ``hidden_size`` (when set) must match it.
* ``mm_cfg.llm.from_pretrained``: a Hugging Face ``LlamaForCausalLM`` directory, a NeMo GPT / LLaMA ``.nemo`` (any
  tensor-parallel layout, see :mod:`vlkit.interop.nemo`), or a vlkit llama / NeVA directory.
  Its architecture replaces ``model.llm``'s; the run-time settings (context length, dropout, activation
  checkpointing, flash attention) stay the config's.
* ``mm_cfg.pretrain_mm_mlp_adapter``: stage-1 projector weights (see :func:`load_adapter`).

:func:`neva_from_weights` goes the other way round: a saved NeVA whose weights file holds only part of the model (a
stage-1 checkpoint: the projector) gets the rest from the parts its config names.

Large parts are never initialised twice: the model is built on the meta device and each part either takes the
loaded tensors as they are or is materialised and initialised on ``device``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from vlkit.config.schema import LLMConfig, MMConfig, ModelConfig, TransformerConfig, VisionConfig
from vlkit.interop.files import WEIGHTS_FILE, ModelFormatError, read_json, read_weights_file
from vlkit.models.factory import create_model, resolve_model_config
from vlkit.models.neva import NevaModel, freeze, load_trainable_state_dict
from vlkit.nn import RotaryEmbedding

# The format dispatcher (vlkit.interop.native.load_model): a pretrained part may be stored in any format it reads,
# NeVA's own included, so it is passed in rather than imported (the dispatcher builds NeVA models with this module).
LoadModel = Callable[..., nn.Module]

# model.llm settings that belong to the run, not to the checkpoint: they survive a pretrained LLM.
RUN_SETTINGS = (
    "encoder_seq_length", "hidden_dropout", "attention_dropout", "drop_path_rate", "activations_checkpoint_granularity",
    "activations_checkpoint_method", "activations_checkpoint_num_layers", "use_flash_attention",
)  # fmt: skip
LLAVA_ADAPTER_FILE = "mm_projector.bin"


def resolve_pretrained(value: str, key: str, from_hf: bool = False) -> Path:
    """A local path for a ``from_pretrained`` value: the path itself, or (``from_hf``, a known Hub name, or a value
    shaped like a Hub id) ``$VLKIT_MODELS/org/name`` or its snapshot in the local Hugging Face cache (see
    :func:`vlkit.interop.hub.locate`). vlkit never downloads.

    Raises:
        NotDownloadedError (a FileNotFoundError): none exists; the message says where it looked and how to fetch it.
    """
    from vlkit.interop.hub import locate

    return locate(value, key, from_hf)


def _differences(key: str, old: TransformerConfig, new: TransformerConfig, skip: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{key}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in fields(new)
        if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    ]


def _load_vision(
    cfg: ModelConfig, load_model: LoadModel, device: torch.device | str
) -> tuple[nn.Module, VisionConfig, list[str]]:
    """(the whole pretrained tower, its config, notes)."""
    from vlkit.interop.vision import load_vision_tower

    enc = cfg.mm_cfg.vision_encoder
    key = "model.mm_cfg.vision_encoder.from_pretrained"
    path = resolve_pretrained(enc.from_pretrained, key, enc.from_hf)
    overrides = {}
    if enc.crop_size is not None:
        overrides = {"vision__img_h": int(enc.crop_size[0]), "vision__img_w": int(enc.crop_size[1])}
    tower = load_vision_tower(path, load_model, device=device, **overrides)
    vision = replace(tower.config, output_dim=None)  # NeVA reads hidden states; a CLIP projection is never used
    for name, said in (("patch_dim", enc.patch_dim), ("hidden_size", enc.hidden_size)):
        if said is not None and said != getattr(vision, name):
            raise ValueError(
                f"model.mm_cfg.vision_encoder.{name}={said}, but the tower at {path} has {name}={getattr(vision, name)}"
            )
    notes = [f"vision tower from {path}"] + _differences("model.vision", cfg.vision, vision)
    return tower, vision, notes


def _load_llm(cfg: ModelConfig, load_model: LoadModel, device: torch.device | str) -> tuple[dict, LLMConfig, list[str]]:
    """(the decoder's state dict, the merged LLM config, notes)."""
    from vlkit.interop.hf_llama import is_hf_llama_config, load_hf_llama

    key = "model.mm_cfg.llm.from_pretrained"
    path = resolve_pretrained(cfg.mm_cfg.llm.from_pretrained, key)
    config_file = path / "config.json"
    if config_file.is_file() and is_hf_llama_config(read_json(config_file)):
        decoder = load_hf_llama(path, device=device).llm
    else:
        model = load_model(path, device=device)
        decoder = getattr(model, "llm", None)
        if decoder is None:
            raise ModelFormatError(f"{key}={path}: a {type(model).__name__} holds no language model")
    llm = replace(decoder.config, **{name: getattr(cfg.llm, name) for name in RUN_SETTINGS})
    notes = [f"language model from {path}"] + _differences("model.llm", cfg.llm, llm)
    return decoder.state_dict(), llm, notes


def _materialize(module: nn.Module, device: torch.device | str) -> None:
    """Storage for a part built on the meta device, with every layer's own init (the part's ``init_weights``
    follows): ``to_empty`` leaves garbage, and ``init_weights`` does not set norms (LayerNorm gains would stay
    ~1e34). RoPE tables are computed, not stored."""
    module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_parameters(device)
        elif callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


def build_neva_model(
    cfg: ModelConfig, load_model: LoadModel, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[NevaModel, list[str]]:
    """The NeVA of ``cfg`` with the pretrained parts its ``mm_cfg`` names, the rest freshly initialised.

    ``load_model`` is the format dispatcher (:func:`vlkit.interop.native.load_model`) that reads a pretrained part
    in whatever format it is stored; ``vlkit.interop.native.build_neva_model`` passes it.

    Returns:
        (model, notes): ``model.config`` is the config that really describes it (a pretrained tower's architecture
        replaces the one in ``cfg``: build data from it); ``notes`` say where each part came from and what changed.

    Raises:
        FileNotFoundError: a named checkpoint is missing.
        ModelFormatError / ValueError: a checkpoint that does not fit (the message names the key and the path).
    """
    from vlkit.interop.files import assign_state_dict

    cfg = resolve_model_config(cfg)
    mm = cfg.mm_cfg or MMConfig()
    notes: list[str] = []
    tower = decoder_state = None
    if mm.vision_encoder.from_pretrained:
        tower, vision, more = _load_vision(cfg, load_model, device)
        cfg, notes = replace(cfg, vision=vision), notes + more
    if mm.llm.from_pretrained:
        decoder_state, llm, more = _load_llm(cfg, load_model, device)
        cfg, notes = replace(cfg, llm=llm), notes + more
    cfg = resolve_model_config(cfg)  # validates the merged config (the layer read must exist in the new tower)
    model = create_model(cfg, device="meta")

    if tower is None:
        _materialize(model.vision_tower, device)
        model.vision_tower.tower.init_weights()
    else:
        wanted = model.vision_tower.tower.state_dict()
        assign_state_dict(
            model.vision_tower.tower, {k: t for k, t in tower.state_dict().items() if k in wanted}, device
        )
    if decoder_state is None:
        _materialize(model.llm, device)
        model.llm.init_weights()
    else:
        assign_state_dict(model.llm, decoder_state, device)
    _materialize(model.projector, device)
    for name in ("im_start", "im_end"):
        p = getattr(model, name)
        if p is not None:
            setattr(model, name, nn.Parameter(torch.empty(p.shape, device=device)))
    model.reset_adapter()
    if model.im_start is not None and decoder_state is not None:
        with torch.no_grad():  # LLaVA's start for new token embeddings: the mean of the trained ones
            mean = model.llm.embed.weight.float().mean(0)
            model.im_start.copy_(mean)
            model.im_end.copy_(mean)
    if mm.pretrain_mm_mlp_adapter:
        notes.append(f"projector from {load_adapter(model, mm.pretrain_mm_mlp_adapter)}")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_neva_model left tensors uninitialised: {left[:6]}")
    if dtype is not None:
        model = model.to(dtype)
    freeze(model)
    return model, notes


# -- stage-1 projector weights -----------------------------------------------------------------------------------------
def adapter_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Where the weights a ``pretrain_mm_mlp_adapter`` value names are, and the weights (see :func:`load_adapter`).

    A trainer's run directory or checkpoints folder stands for its latest complete checkpoint (the one rule of
    :func:`vlkit.interop.checkpoint_files.find_checkpoint`); a checkpoint is read in either format, a sharded one
    (FSDP2 / tensor-parallel stage 1) consolidated in this process."""
    from vlkit.interop.checkpoint_files import CheckpointError, find_checkpoint, is_checkpoint, read_model_state

    key = "model.mm_cfg.pretrain_mm_mlp_adapter"
    if path.is_file():
        return path, read_weights_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{key}={path}: no such file or directory")
    try:
        if is_checkpoint(path):
            return path, read_model_state(path)
        for candidate in (path / WEIGHTS_FILE, path / LLAVA_ADAPTER_FILE):  # a model directory, LLaVA's output
            if candidate.is_file():
                return candidate, read_weights_file(candidate)
        checkpoint = find_checkpoint(path)
        if checkpoint is not None:
            return checkpoint, read_model_state(checkpoint)
    except CheckpointError as e:
        raise FileNotFoundError(f"{key}={path}: {e}") from None
    raise FileNotFoundError(
        f"{key}={path}: holds no {WEIGHTS_FILE}, {LLAVA_ADAPTER_FILE} or complete trainer checkpoint"
    )


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector (and start/end) tensors of a checkpoint, under vlkit's names. LLaVA's ``mm_projector.bin``
    (``model.mm_projector.*``, a bare Linear for the linear type) is renamed."""
    out = {}
    for key, t in state.items():
        key = key.removeprefix("model.")
        if key.startswith("mm_projector."):
            rest = key.removeprefix("mm_projector.")
            key = "projector." + ("0." + rest if rest in ("weight", "bias") else rest)
        if key.startswith("projector.") or key in ("im_start", "im_end"):
            out[key] = t
    return out


def load_adapter(model: NevaModel, path: str | Path) -> Path:
    """Load stage-1 projector weights into ``model``; returns the file read.

    ``path``: a vlkit model or checkpoint directory (``model.safetensors``, whole or trainable-only), a trainer's
    checkpoints directory (its ``latest``), a safetensors file, or LLaVA's ``mm_projector.bin`` (read with
    ``weights_only``).

    Raises:
        ValueError: the file holds no projector, or one that does not fit (the message names the file).
    """
    file, weights = adapter_weights(Path(path))
    state = adapter_state(weights)
    expected = sorted(k for k, _ in model.named_parameters() if k.startswith("projector."))
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{file}: no projector weights for {missing} (found {sorted(state)[:6] or 'none'}); is it a checkpoint of "
            f"model.mm_cfg.mm_mlp_adapter_type={model.config.mm_cfg.mm_mlp_adapter_type}?"
        )
    load_trainable_state_dict(model, state, str(file))
    return file


# -- saved models that hold part of the weights ------------------------------------------------------------------------
def neva_from_weights(
    cfg: ModelConfig | dict,
    state: dict[str, torch.Tensor],
    load_model: LoadModel,
    *,
    device: torch.device | str = "cpu",
    where: str = "",
) -> NevaModel:
    """The NeVA of a saved config with the weights ``state``, whole or partial (a trainer checkpoint that left out
    the frozen parts its config loads from ``from_pretrained``, as stage 1 does).

    A part (``vision_tower``, ``llm``, the projector) found in ``state`` comes from it; a part it lacks comes from the
    config's ``from_pretrained`` (the projector: ``pretrain_mm_mlp_adapter``). Nothing is left at random init.

    Raises:
        ModelFormatError: ``state`` holds tensors the model does not have, or of the wrong shape, or lacks a part the
            config cannot rebuild either (the message names ``where`` and the tensors).
    """
    cfg = resolve_model_config(cfg)
    mm = cfg.mm_cfg or MMConfig()

    def holds(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    llm = replace(mm.llm, from_pretrained=None) if holds("llm.") else mm.llm
    enc = replace(mm.vision_encoder, from_pretrained=None) if holds("vision_tower.") else mm.vision_encoder
    adapter = None if holds("projector.") else mm.pretrain_mm_mlp_adapter
    cfg = replace(cfg, mm_cfg=replace(mm, llm=llm, vision_encoder=enc, pretrain_mm_mlp_adapter=adapter))
    model, _ = build_neva_model(cfg, load_model, device=device)
    elsewhere = tuple(
        prefix
        for prefix, source in (
            ("vision_tower.", enc.from_pretrained),
            ("llm.", llm.from_pretrained),
            ("projector.", adapter),
        )  # fmt: skip
        if source
    )
    expected = model.state_dict()
    unknown = sorted(k for k in state if k not in expected)
    wrong = [f"{k}: {tuple(t.shape)} (model: {tuple(expected[k].shape)})" for k, t in state.items()
             if k in expected and tuple(t.shape) != tuple(expected[k].shape)]  # fmt: skip
    missing = sorted(k for k in expected if k not in state and not k.startswith(elsewhere))
    problems = [f"unknown tensors {unknown[:6]}"] if unknown else []
    problems += [f"shapes {', '.join(wrong[:6])}"] if wrong else []
    problems += [f"missing {missing[:6]} (and no from_pretrained names them)"] if missing else []
    if problems:
        raise ModelFormatError(f"{where or 'weights'}: do not fit the NeVA config: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return model


# -- the architecture of the named parts, without their weights --------------------------------------------------------
def _config_dict(path: Path) -> tuple[str, dict] | None:
    """(format, config.json) of a local model directory, or None where the format holds no readable config."""
    from vlkit.interop.detect import detect_format

    kind, where = detect_format(path)
    if kind == "nemo" or not where.is_dir() or not (where / "config.json").is_file():
        return (kind, {}) if kind == "nemo" else None
    return kind, read_json(where / "config.json")


def _vision_architecture(enc, key: str) -> tuple[dict | None, str]:
    from vlkit.interop.hub import hub_model_config, known_name

    name = known_name(enc.from_pretrained)
    if name is not None:
        model = hub_model_config(name)
        return (model.get("vision"), f"{key}={name}: architecture from vlkit's table of Hub configs")
    path = resolve_pretrained(enc.from_pretrained, key, enc.from_hf)
    found = _config_dict(path)
    if found is None:
        return None, f"{key}={path}: architecture read when the weights are loaded"
    kind, config = found
    if kind in ("hf", "hf_vision"):
        from vlkit.interop.hf import PREPROCESSOR_FILE, hf_vision_section

        pre_file = path / PREPROCESSOR_FILE
        pre = read_json(pre_file) if pre_file.is_file() else None
        return hf_vision_section(config, pre, path / "config.json"), f"{key}={path}: architecture from its config"
    if kind in ("vlkit", "checkpoint") and isinstance(config.get("model", {}).get("vision"), dict):
        return config["model"]["vision"], f"{key}={path}: architecture from its config"
    return None, f"{key}={path}: architecture read when the weights are loaded"


def _llm_architecture(cfg: ModelConfig, key: str) -> tuple[LLMConfig | None, str]:
    from vlkit.interop.hub import hub_model_config, known_name

    value = cfg.mm_cfg.llm.from_pretrained
    name = known_name(value)
    if name is not None:
        llm = hub_model_config(name)["llm"]
        return LLMConfig(**llm), f"{key}={name}: architecture from vlkit's table of Hub configs"
    path = resolve_pretrained(value, key)
    found = _config_dict(path)
    if found is None:
        return None, f"{key}={path}: architecture read when the weights are loaded"
    kind, config = found
    if kind == "nemo":
        from vlkit.interop.nemo import llm_config_from_nemo, read_nemo_config

        raw = read_nemo_config(path)
        vocab = raw.get("padded_vocab_size") or raw.get("vocab_size") or cfg.llm.vocab_size
        return llm_config_from_nemo(raw, vocab, f"{path}"), f"{key}={path}: architecture from its model_config.yaml"
    if kind == "hf_llama":
        from vlkit.interop.hf_llama import llm_config_from_hf

        return llm_config_from_hf(config, str(path)), f"{key}={path}: architecture from its config"
    if kind in ("vlkit", "checkpoint") and isinstance(config.get("model", {}).get("llm"), dict):
        return resolve_model_config(config["model"]).llm, f"{key}={path}: architecture from its config"
    return None, f"{key}={path}: architecture read when the weights are loaded"


def pretrained_architecture(cfg: ModelConfig, missing_ok: bool = True) -> tuple[ModelConfig, list[str]]:
    """``cfg`` with ``model.vision`` / ``model.llm`` replaced by the architectures its ``mm_cfg`` names (a known Hub
    name from vlkit's table, a local directory from its config, a ``.nemo`` from its ``model_config.yaml``) -- what
    :func:`build_neva_model` would build, without reading a weight. The run-time settings stay the config's.

    ``missing_ok``: a named part with no local copy keeps the config's architecture (a note says so) instead of
    raising :class:`vlkit.interop.hub.NotDownloadedError`.
    """
    from vlkit.interop.hub import NotDownloadedError

    cfg = resolve_model_config(cfg)
    mm = cfg.mm_cfg
    if cfg.arch != "neva" or mm is None:
        return cfg, []
    notes: list[str] = []
    enc = mm.vision_encoder
    if enc.from_pretrained:
        try:
            vision, note = _vision_architecture(enc, "model.mm_cfg.vision_encoder.from_pretrained")
        except NotDownloadedError as e:
            if not missing_ok:
                raise
            vision, note = None, f"{e} (the config's model.vision is shown)"
        notes.append(note)
        if vision is not None:
            vision = {**vision, "output_dim": None}
            if enc.crop_size is not None:
                vision.update(img_h=int(enc.crop_size[0]), img_w=int(enc.crop_size[1]))
            cfg = replace(cfg, vision=VisionConfig(**vision))
    if mm.llm.from_pretrained:
        try:
            llm, note = _llm_architecture(cfg, "model.mm_cfg.llm.from_pretrained")
        except NotDownloadedError as e:
            if not missing_ok:
                raise
            llm, note = None, f"{e} (the config's model.llm is shown)"
        notes.append(note)
        if llm is not None:
            cfg = replace(cfg, llm=replace(llm, **{name: getattr(cfg.llm, name) for name in RUN_SETTINGS}))
    return resolve_model_config(cfg), notes
