"""Which model a path holds, judged by content, and which directory a model path stands for (a run directory's
latest complete checkpoint, by the trainer's one rule).

Below every loader: the NeVA and vision-tower loaders ask here what a pretrained part is before they load it, and
:mod:`vlkit.interop.native` (the dispatcher) asks the same before it picks a format module.
"""

from __future__ import annotations

from pathlib import Path

from vlkit.interop.checkpoint_files import CheckpointError, find_checkpoint, is_checkpoint
from vlkit.interop.files import (
    CONFIG_FILE,
    FORMAT,
    OPEN_CLIP_CONFIG_FILE,
    RUN_MODEL_DIR,
    ModelFormatError,
    read_json,
    read_weights_keys,
)


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def resolve_model_source(path: str | Path) -> Path:
    """The directory a model path stands for.

    A model or checkpoint directory, or a file, is itself. A run directory (``trainer.output_dir``) or a checkpoints
    folder stands for its latest complete checkpoint, by the rule the trainer resumes with (the ``latest`` pointer
    when it names a complete checkpoint, else the newest complete one); a run directory without one, for the model
    the trainer exported into it (``model/``). Anything else is itself (:func:`detect_format` then says what it is).

    Raises:
        ModelFormatError: the directory holds checkpoints, none of them complete, and no exported model.
    """
    path = Path(path)
    if not path.is_dir() or is_checkpoint(path):
        return path
    if (path / CONFIG_FILE).is_file() or (path / OPEN_CLIP_CONFIG_FILE).is_file():
        return path
    exported = path / RUN_MODEL_DIR
    try:
        found = find_checkpoint(path)
    except CheckpointError as e:
        if (exported / CONFIG_FILE).is_file():
            return exported
        raise ModelFormatError(str(e)) from None
    if found is not None:
        return found
    return exported if (exported / CONFIG_FILE).is_file() else path


def resolve_model_path(path: str) -> str:
    """The directory ``--model PATH`` stands for: a model or checkpoint directory is itself; a run directory or its
    ``checkpoints/`` folder, its latest complete checkpoint (the trainer's rule; see
    :func:`resolve_model_source`). Left as given when nothing fits, so that loading it says
    what is wrong."""
    try:
        found = resolve_model_source(path)
    except (ModelFormatError, OSError):
        return path
    return path if found == Path(path) else str(found)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """Which kind of model ``path`` holds, judged by content: ``(kind, where)``.

    kind is ``vlkit`` (config.json with ``format: vlkit``), ``checkpoint`` (a trainer checkpoint directory, single
    or sharded; a run directory or a checkpoints folder gives its latest complete one, see
    :func:`resolve_model_source`), ``hf`` (a transformers CLIPModel config.json), ``hf_vision`` (a CLIPVisionModel
    config.json: a vision tower only), ``hf_llama`` (a LlamaForCausalLM config.json), ``llava`` (a
    LlavaForConditionalGeneration config.json), ``nemo`` (a NeMo ``.nemo`` tar or its extracted directory: a
    GPT / LLaMA language model) or ``open_clip`` (open_clip_config.json, or a weights file whose keys are
    open_clip's). ``where`` is the directory (or, for a bare checkpoint, the file) to load; a path to a
    directory's config.json means the directory.

    Raises:
        ModelFormatError: anything else; the message names the path and what was found there.
    """
    from vlkit.interop import open_clip
    from vlkit.interop.hf import is_hf_clip_config, is_hf_clip_vision_config, looks_like_hf_clip_state_dict
    from vlkit.interop.hf_llama import is_hf_llama_config
    from vlkit.interop.hf_llava import is_hf_llava_config

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    if path.is_file() and path.name in (CONFIG_FILE, OPEN_CLIP_CONFIG_FILE):
        return detect_format(path.parent)
    if is_checkpoint(path):
        return "checkpoint", path
    from vlkit.interop.nemo import is_nemo

    if is_nemo(path):
        return "nemo", path
    if path.is_file() and path.suffix == ".nemo":
        raise ModelFormatError(f"{path}: not a NeMo checkpoint (a tar holding model_config.yaml and the weights)")
    resolved = resolve_model_source(path)
    if resolved != path:
        return detect_format(resolved)
    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        config = read_json(cfg_file) if cfg_file.is_file() else None
        if config is not None:
            if config.get("format") == FORMAT:
                return "vlkit", path
            if is_hf_clip_config(config):
                return "hf", path
            if is_hf_clip_vision_config(config):
                return "hf_vision", path
            if is_hf_llava_config(config):
                return "llava", path
            if is_hf_llama_config(config):
                return "hf_llama", path
        if open_clip.is_open_clip_dir(path):
            return "open_clip", path
        if config is None:
            raise ModelFormatError(
                f"{path}: no {CONFIG_FILE} (vlkit or Hugging Face) and no {OPEN_CLIP_CONFIG_FILE}; {_listing(path)}"
            )
        raise ModelFormatError(
            f"{cfg_file}: not a vlkit model config (format={config.get('format')!r}) nor a Hugging Face CLIP, LLaMA "
            f"or LLaVA config (model_type={config.get('model_type')!r}, architectures={config.get('architectures')!r})"
        )
    keys = read_weights_keys(path)
    if open_clip.looks_like_open_clip_state_dict(keys):
        return "open_clip", path
    if looks_like_hf_clip_state_dict(keys):
        raise ModelFormatError(
            f"{path}: Hugging Face CLIP weights without their config: pass the directory holding them and config.json"
        )
    if any(k.startswith(("visual.patch_embed.", "backbone.patch_embed.")) for k in keys):
        raise ModelFormatError(f"{path}: vlkit weights: pass the model directory (with its {CONFIG_FILE})")
    raise ModelFormatError(f"{path}: a weights file of no known layout; its {len(keys)} keys begin {keys[:4]}")
