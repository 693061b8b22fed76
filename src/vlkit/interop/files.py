"""The bottom of interop: what every format module shares -- file names, the format error, atomic directory writes,
JSON and weights-file readers, header checks before allocating, and the pos-embed refit.

Format modules (hf, hf_llama, hf_llava, open_clip) import this, never :mod:`vlkit.interop.native`: native is the
dispatcher (:func:`~vlkit.interop.native.detect_format`, :func:`~vlkit.interop.native.load_model`) that imports them,
so keeping the helpers here is what keeps the imports a tree. Each name is defined once, here.
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
from vlkit.interop.checkpoint_files import MODEL_FILE, CheckpointError, SafetensorsHeader, read_safetensors_header
from vlkit.models.factory import create_model, model_config_dict
from vlkit.nn import RotaryEmbedding
from vlkit.utils.errors import UserError
from vlkit.utils.fs import fsync_dir

FORMAT = "vlkit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = MODEL_FILE  # a checkpoint's model weights file is a model directory's: one name
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"  # what save_open_clip writes next to it
RUN_MODEL_DIR = "model"  # where the trainer writes the trained model, inside trainer.output_dir
# config.json keys naming the tokenizer files a converter copied into the directory (see interop/hf.py).
TOKENIZER_FILES_KEY = "tokenizer_files"


class ModelFormatError(UserError, ValueError):
    """The path does not hold a model vlkit can load; the message says what was found."""


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without torch.compile's ``_orig_mod.`` prefixes, so compiled and eager models share checkpoints."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
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
    tensors, aliases = dedupe(state)
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


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Load ``state`` into a model built on the meta device, taking the tensors as they are (no second copy, no
    random init of billions of weights first); tied weights are tied again and RoPE buffers computed on ``device``."""
    ties: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(name)
    model.load_state_dict({k: t.to(device) for k, t in state.items()}, strict=True, assign=True)
    for first, *aliases in ties.values():
        for alias in aliases:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters(device)
