"""vlkit's own model directory: ``config.json`` (format marker + model config) and ``model.safetensors``.

Writing is atomic: everything goes to a temporary sibling directory, is fsynced, and replaces the target with a
rename, so a crash mid-save never destroys the previous good copy.

:func:`load_model` also takes Hugging Face CLIP directories and open_clip checkpoints: the format is recognised by
content (the config's fields, a weights file's keys), never by file name. Pickled weights (``.bin``/``.pt``) are
read with ``torch.load(weights_only=True)`` only, so a file that would run code is refused, never executed.

Training outputs load the same way (:func:`resolve_model_source`): a checkpoint directory, single or sharded (a
sharded one is consolidated into full tensors in this process, see :mod:`vlkit.interop.checkpoint_files`), or a run
directory / its ``checkpoints/`` folder, meaning its latest complete checkpoint. :func:`save_full_model` writes a
model directory from any parallel layout; the trainer uses it for ``<output_dir>/model``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlkit import __version__
from vlkit.interop.checkpoint_files import (
    CheckpointError,
    SafetensorsHeader,
    find_checkpoint,
    is_checkpoint,
    read_model_state,
    read_safetensors_header,
    read_tensors,
    read_train_state,
    run_model_config,
)
from vlkit.models.factory import create_model, model_config_dict, resolve_model_config
from vlkit.utils.errors import UserError
from vlkit.utils.modules import is_sharded, unwrap

FORMAT = "vlkit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
RUN_MODEL_DIR = "model"  # where the trainer writes the trained model, inside trainer.output_dir
# config.json keys naming the tokenizer files a converter copied into the directory (see interop/hf.py).
TOKENIZER_FILES_KEY = "tokenizer_files"


class ModelFormatError(UserError, ValueError):
    """The path does not hold a model vlkit can load; the message says what was found."""


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without torch.compile's ``_orig_mod.`` prefixes, so compiled and eager models share checkpoints."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one name, record the others as aliases."""
    tensors, aliases, owner = {}, {}, {}
    for name, t in state.items():
        key = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if t.numel()
            else None
        )
        if key is not None and key in owner:
            aliases[name] = owner[key]
            continue
        if key is not None:
            owner[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(target: Path, write: Any) -> None:
    """Call ``write(tmp_dir)``, fsync it, then swap it in for ``target`` (the old copy survives until then)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any directory the user makes
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                # safetensors' writer creates its files 0600 whatever the umask; shared storage needs the mode of
                # any file the user makes (eval jobs and colleagues read checkpoints and exports).
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(model: nn.Module, directory: Path, extra: dict | None = None) -> None:
    """Write config.json and model.safetensors of ``model`` into an existing directory (no atomicity: callers
    write into :func:`atomic_write_dir`'s temporary directory, possibly with more files next to them)."""
    model = getattr(model, "_orig_mod", model)
    _write_files(model_config_dict(model), clean_state_dict(model), directory, extra)


def _write_files(model_config: dict, state: dict[str, torch.Tensor], directory: Path, extra: dict | None) -> None:
    config = {"format": FORMAT, "vlkit_version": __version__, "model": model_config, **(extra or {})}
    tensors, aliases = _dedupe(state)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def save_converted(model: nn.Module, out: Path, src: Path, files: list[str], converted_from: dict) -> None:
    """Write a converted model atomically: config.json and weights, plus ``files`` (the tokenizer's) copied from
    ``src``, recorded in the config with where the model came from."""
    extra = {TOKENIZER_FILES_KEY: files, "converted_from": converted_from}

    def write(tmp: Path) -> None:
        write_model_files(model, tmp, extra)
        for name in files:
            shutil.copyfile(src / name, tmp / name)

    atomic_write_dir(out, write)


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (built by :func:`vlkit.create_model`) to directory ``path``; returns the path."""
    atomic_write_dir(Path(path), lambda tmp: write_model_files(model, tmp, extra))
    return Path(path)


def save_full_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path | None:
    """Write the whole of ``model`` as a vlkit model directory, whatever its layout: plain, DDP, ``torch.compile``d,
    or sharded by FSDP2 / tensor parallel (its DTensors are gathered into full CPU tensors first).

    Collective when ``torch.distributed`` is initialised: every rank calls it (gathering a sharded model is a
    collective); rank 0 writes (atomically, as :func:`save_model`) and returns the path, the others return None.

    Raises:
        TypeError: the model was not built by :func:`vlkit.create_model` (no config to write); raised on every rank,
            before any collective.
    """
    import torch.distributed as dist

    inner = unwrap(model)
    config = model_config_dict(inner)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if is_sharded(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Every rank takes part in the gather; with cpu_offload only rank 0 keeps the full tensors.
        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = inner.state_dict() if rank == 0 else {}
    if rank != 0:
        return None
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    atomic_write_dir(Path(path), lambda tmp: _write_files(config, state, tmp, extra))
    return Path(path)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; anything else is a ModelFormatError naming the file."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{file}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ModelFormatError(f"{file}: not a text file") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{file}: expected a JSON object, found a {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE if path.is_dir() else path
    if not cfg_file.is_file():
        raise ModelFormatError(f"{path}: no {CONFIG_FILE} found (expected a vlkit model directory)")
    config = read_json(cfg_file)
    if config.get("format") != FORMAT:
        raise ModelFormatError(f"{cfg_file}: not a vlkit model config (format={config.get('format')!r})")
    return config


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a vlkit model directory (aliases restored)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        return read_tensors(weights, device)
    except CheckpointError as e:  # a damaged header: the same one-line message, as the loaders' error class
        raise ModelFormatError(str(e)) from None


def read_header(file: str | Path) -> SafetensorsHeader:
    """A safetensors file's tensor names, dtypes and shapes, from its header alone (nothing allocated).

    Raises:
        ModelFormatError: the file is not a well-formed safetensors file (the message names it).
    """
    try:
        return read_safetensors_header(file)
    except CheckpointError as e:
        raise ModelFormatError(str(e)) from None


_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def declared_tensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the dtypes and shapes a safetensors file declares: its header only, nothing allocated, so
    a converter's renaming and fusing can run on them to find the shapes before the weights are read."""
    return {
        name: torch.empty(shape, dtype=_TORCH_DTYPES.get(dtype, torch.float32), device="meta")
        for name, (dtype, shape) in read_header(file).tensors.items()
    }


def dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    """fp32 | bf16 | fp16: the floating dtype most of ``tensors``' elements are stored in (fp32 when unsure)."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.dtype in _DTYPE_NAMES:
            counts[_DTYPE_NAMES[t.dtype]] = counts.get(_DTYPE_NAMES[t.dtype], 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else "fp32"


def check_before_loading(
    build: Any, stored: dict[str, tuple[int, ...]], where: str | Path, config: Any, *, prefix: str = "",
    device: str | torch.device = "cpu", dtype: str = "fp32",
) -> nn.Module:  # fmt: skip
    """What can be refused before a model is allocated, checked on the meta device; returns the meta model.

    ``build()`` makes the model the config describes (called under the meta device); ``stored`` maps the model's
    own parameter names to the shapes the weights file declares (read from its header); ``config`` is the raw config
    (a dict as read from ``where``, or a dataclass), searched for the key to name. Refused, in this order: a size
    torch cannot describe at all; a stored tensor whose shape is not the one the config implies (the tensor and
    both shapes named); a model whose parameters (at ``dtype``) exceed the memory of ``device``'s machine.

    Raises:
        ModelFormatError: a shape contradicts the config; TooLargeError: the model cannot fit (both exit 2).
    """
    from vlkit.utils.memory import TooLargeError, blame_key, build_on_meta, estimate_model, machine_memory, too_large

    meta = build_on_meta(build, config, prefix=prefix, where=str(where))
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    for name, shape in stored.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            key = blame_key(config, tuple(d for d in want if d not in shape), prefix)
            raise ModelFormatError(
                f"{where}: the weights do not fit the config: tensor {name} is stored as {list(shape)}, the config "
                f"implies {list(want)}" + (f" ({key})" if key else "")
            )
    device = torch.device(device)
    available, machine = machine_memory("cuda" if device.type == "cuda" else "cpu", processes=1)
    problem = too_large(estimate_model(meta, config, dtype=dtype, prefix=prefix), available, machine)
    if problem is not None:
        raise TooLargeError(f"{where}: {problem}")
    return meta


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Shapes a vlkit weights file declares, under every name its tensors are loaded as (aliases too)."""
    header = read_header(file)
    shapes = {name: shape for name, (_, shape) in header.tensors.items()}
    try:
        aliases = json.loads(header.metadata.get("aliases", "{}"))
    except json.JSONDecodeError:
        aliases = {}
    for alias, name in aliases.items() if isinstance(aliases, dict) else ():
        if name in shapes:
            shapes[alias] = shapes[name]
    return shapes


def _is_safetensors(file: Path) -> bool:
    """safetensors files start with the 8-byte little-endian length of a JSON header, then the header itself (the
    length is not trusted here: a wrong one is reported by the header checks, naming the file)."""
    with open(file, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_weights_file(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: safetensors, or a PyTorch file read with ``torch.load(weights_only=True)``.

    A training checkpoint that nests the weights under ``state_dict`` (open_clip's) is unwrapped. A pickle that needs
    anything beyond tensors and plain containers (for example one that would call a function while loading) is
    refused with a ModelFormatError: vlkit never unpickles with full pickle.
    """
    file = Path(file)
    if _is_safetensors(file):
        read_header(file)  # bounded and checked first: a damaged file is named, not a Rust error
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    try:
        # A file object, not the path: recent torch.load hands paths ending in .safetensors to safetensors itself.
        with open(file, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on TorchScript archives and pickle protocols
            data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "error:" in ln), "")
        raise ModelFormatError(
            f"{file}: refused: torch.load(weights_only=True) cannot read it as plain tensors"
            + (f" ({detail})" if detail else "")
            + ". vlkit never unpickles with full pickle, which could run code; if you trust this file, re-save its "
            "state dict with safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if "TorchScript" in str(e):
            raise ModelFormatError(
                f"{file}: a TorchScript archive (OpenAI's original CLIP release format) cannot be read without running "
                "its code; use the Hugging Face or open_clip copy of the weights, or a state dict saved as safetensors"
            ) from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{file}: not a safetensors or PyTorch weights file ({first_line})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFormatError(f"{file}: holds a {type(data).__name__}, not a state dict")
    others = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ModelFormatError(f"{file}: not a state dict: entries {others[:5]} are not tensors")
    return data


def read_weights_keys(file: str | Path) -> list[str]:
    """The tensor names of a weights file: from the header alone for safetensors, else as read_weights_file."""
    file = Path(file)
    if _is_safetensors(file):
        return list(read_header(file).tensors)
    return list(read_weights_file(file))


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _open_clip_api():
    """vlkit.interop.open_clip, or None where it is not installed (the format is then not recognised)."""
    try:
        from vlkit.interop import open_clip
    except ImportError as e:
        if e.name in ("vlkit.interop.open_clip", "open_clip"):
            return None
        raise
    return open_clip


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
    :func:`vlkit.interop.native.resolve_model_source`). Left as given when nothing fits, so that loading it says
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
    LlavaForConditionalGeneration config.json) or ``open_clip`` (open_clip_config.json, or a weights file whose
    keys are open_clip's). ``where`` is the directory (or, for a bare checkpoint, the file) to load; a path to a
    directory's config.json means the directory.

    Raises:
        ModelFormatError: anything else; the message names the path and what was found there.
    """
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
    resolved = resolve_model_source(path)
    if resolved != path:
        return detect_format(resolved)
    open_clip = _open_clip_api()
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
        if open_clip is not None and open_clip.is_open_clip_dir(path):
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
    if open_clip is not None and open_clip.looks_like_open_clip_state_dict(keys):
        return "open_clip", path
    if looks_like_hf_clip_state_dict(keys):
        raise ModelFormatError(
            f"{path}: Hugging Face CLIP weights without their config: pass the directory holding them and config.json"
        )
    if any(k.startswith(("visual.patch_embed.", "backbone.patch_embed.")) for k in keys):
        raise ModelFormatError(f"{path}: vlkit weights: pass the model directory (with its {CONFIG_FILE})")
    hint = "" if open_clip is not None else " (open_clip support, vlkit.interop.open_clip, is not available)"
    raise ModelFormatError(f"{path}: a weights file of no known layout{hint}; its {len(keys)} keys begin {keys[:4]}")


def vision_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid of the model's vision tower (None without one)."""
    from vlkit.models.vit import VisionTransformer

    return next((tuple(m.grid_size) for m in model.modules() if isinstance(m, VisionTransformer)), None)


def fit_pos_embed(state: dict[str, torch.Tensor], model: nn.Module, old_grid: tuple[int, int] | None) -> None:
    """Resample (in place) the vision tower's stored position table, made for ``old_grid``, to ``model``'s grid.

    Done here, knowing the stored grid, rather than by the tower's load hook, which has to guess it (and cannot
    when an override changes the aspect ratio, e.g. 224x224 -> 224x336).
    """
    from vlkit.models.vit import VisionTransformer
    from vlkit.nn import resample_pos_embed

    for name, module in model.named_modules():
        if not isinstance(module, VisionTransformer) or old_grid is None:
            continue
        key = f"{name}.pos_embed" if name else "pos_embed"
        if key in state and state[key].ndim == 2 and tuple(module.grid_size) != tuple(old_grid):
            state[key] = resample_pos_embed(state[key], tuple(module.grid_size), module.num_prefix_tokens, old_grid)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path, strict: bool = True) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ModelFormatError(f"{where}: weights do not match the config: missing {missing}, unexpected {unexpected}")


def with_overrides(model: nn.Module, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """``model`` rebuilt with config overrides (e.g. a new image size) and its weights, on ``device``."""
    if not overrides:
        return model.to(device)
    new = create_model(model.config, device=device, **overrides)
    state = clean_state_dict(model)
    fit_pos_embed(state, new, vision_grid(model))
    load_weights(new, state, f"{type(model).__name__} with overrides {overrides}")
    return new


def _load_vlkit(path: Path, device: str | torch.device, strict: bool, overrides: dict[str, Any]) -> nn.Module:
    config = read_config(path)
    text = config["model"].get("text")
    if config.get(TOKENIZER_FILES_KEY) and isinstance(text, dict):
        from vlkit.data.tokenizer import CLIP_NAMES

        if str(text.get("tokenizer", "clip")).lower() not in CLIP_NAMES:
            # The tokenizer files travel with the directory: point at them wherever it now lives.
            text["tokenizer"] = str(path.resolve())
    weights = path / WEIGHTS_FILE
    if weights.is_file():  # shapes and size against the config before anything is allocated
        check_before_loading(lambda: create_model(config["model"]), header_shapes(weights), path / CONFIG_FILE,
                             config, device=device)  # fmt: skip
    return _from_weights(config["model"], load_state_dict(path, device), path, device, strict, overrides)


def _from_weights(
    model_config: dict, state: dict[str, torch.Tensor], where: Path, device: str | torch.device, strict: bool,
    overrides: dict[str, Any],
) -> nn.Module:  # fmt: skip
    if model_config.get("arch") == "neva" and strict and not overrides:
        from vlkit.interop.neva import neva_from_weights

        # A NeVA trainer checkpoint may hold only what trained (stage 1: the projector); the config names the rest.
        return neva_from_weights(model_config, state, device=device, where=str(where))
    stored_grid = None
    if overrides:
        stored_grid = resolve_model_config(model_config).vision.grid_size
    model = create_model(model_config, device=device, **overrides)
    fit_pos_embed(state, model, stored_grid)
    load_weights(model, state, where, strict)
    return model


def _load_checkpoint(path: Path, device: str | torch.device, strict: bool, overrides: dict[str, Any]) -> nn.Module:
    """A trainer checkpoint as a model: the architecture from its ``config.json`` (or, in checkpoints that lack one,
    the run config in ``train_state.json``), the weights consolidated into full tensors (sharded ones too)."""
    try:
        info = read_train_state(path)
        model_config = read_config(path)["model"] if (path / CONFIG_FILE).is_file() else run_model_config(info)
        if model_config is None:
            raise ModelFormatError(
                f"{path}: the checkpoint names no architecture (no {CONFIG_FILE}, no model config in its train state); "
                "was the model built by vlkit.create_model?"
            )
        partial = bool(info.get("partial_model"))
        if partial and (model_config.get("arch") != "neva" or overrides or not strict):
            raise ModelFormatError(
                f"{path}: holds part of the model only (partial_model: true), which cannot be made into a whole "
                f"model here; load the run's exported model directory ({RUN_MODEL_DIR}/ in trainer.output_dir)"
            )
        state = read_model_state(path, info)
    except CheckpointError as e:
        raise ModelFormatError(str(e)) from None
    try:
        return _from_weights(model_config, state, path, device, strict, overrides)
    except FileNotFoundError as e:
        if not partial:
            raise
        raise ModelFormatError(
            f"{path}: holds part of the model only (NeVA's stage 1 saves what trained), and the rest cannot be read "
            f"from where its config names it: {e}. The run's exported model directory ({RUN_MODEL_DIR}/ in "
            "trainer.output_dir) holds the whole model"
        ) from None


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", strict: bool = True, **overrides: Any
) -> nn.Module:
    """Build the model a directory or checkpoint describes and load its weights; the format is recognised by content.

    Takes a vlkit directory, a Hugging Face ``CLIPModel``, ``LlamaForCausalLM`` or ``LlavaForConditionalGeneration``
    directory (the last gives a NeVA model), or an open_clip directory / checkpoint file (see :func:`detect_format`);
    and what training leaves: a checkpoint directory (single or sharded, consolidated in this process without a
    process group), or a run directory / its ``checkpoints/`` folder for its latest complete checkpoint.
    Overrides change the model config before loading, e.g. ``vision__img_h=512, vision__img_w=512`` to fine-tune at a
    higher resolution: position embeddings are resampled to the new grid.

    Raises:
        ModelFormatError: the path holds none of these, or weights that do not fit their config.
    """
    kind, where = detect_format(path)
    if kind == "vlkit":
        return _load_vlkit(where, device, strict, overrides)
    if kind == "checkpoint":
        return _load_checkpoint(where, device, strict, overrides)
    if kind == "hf":
        from vlkit.interop.hf import load_hf

        return load_hf(where, device=device, **overrides)
    if kind in ("llava", "hf_llama"):
        from vlkit.interop.hf_llama import load_hf_llama
        from vlkit.interop.hf_llava import load_hf_llava

        model = (load_hf_llava if kind == "llava" else load_hf_llama)(where, device=device)
        return with_overrides(model, device, **overrides)
    if kind == "hf_vision":
        raise ModelFormatError(
            f"{where}: a Hugging Face CLIP vision tower only (no text tower); load it with vlkit.load_vision_encoder"
        )
    model = _open_clip_api().load_open_clip(where)
    return with_overrides(model, device, **overrides)
