"""The training-checkpoint format on disk, below everything that reads or writes it.

``vlkit.train.checkpoint.CheckpointManager`` writes these directories (see its module for the layout); model
loaders (``vlkit.load_model``, every ``--model``, ``model.init_from``) read them. Both go through this module, so
there is one rule for what counts as a complete checkpoint, which one is the latest, and how a sharded one is
read without unpickling anything:

- ``train_state.json`` is the marker: a checkpoint is complete only when every file it lists is present at its
  size (:func:`read_train_state`);
- the ``latest`` pointer is trusted only when it names a complete checkpoint, else the newest complete one by step
  is taken (:func:`latest_checkpoint`);
- DCP's ``.metadata`` is a pickle: it is vetted by an unpickler that admits only DCP's own metadata classes before
  DCP loads it (:func:`safe_reader`), and non-tensor entries are refused (:func:`tensor_only_planner`);
- :func:`read_model_state` consolidates a checkpoint's model, single or sharded, into full CPU tensors in one
  process without a process group: for the sharded format it allocates every ``model.*`` tensor at its global
  size and dtype from the metadata and lets DCP fill them (resharding to "one process holds everything").

Nothing here imports from the training loop; ``vlkit.train.checkpoint`` imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import inspect
import json
import logging
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from vlkit.utils.errors import UserError

__all__ = [
    "CheckpointError",
    "find_checkpoint",
    "is_checkpoint",
    "is_complete",
    "latest_checkpoint",
    "read_model_state",
    "read_train_state",
    "run_model_config",
]

log = logging.getLogger(__name__)

FORMAT = "vlkit-checkpoint"
VERSION = 1
STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"  # the same file (and name) a vlkit model directory holds
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"  # the trainer's default, inside trainer.output_dir
STEP_DIR = re.compile(r"step_(\d{8,})")
MODEL_PREFIX = "model."  # sharded checkpoints keep the model's tensors under model.<name>, the optimizer's elsewhere
_MARKERS = ("__tensor__", "__tuple__", "__items__")


class CheckpointError(UserError, ValueError):
    """A checkpoint is incomplete, foreign or does not fit the model; the message names the file or parameter."""


# --------------------------------------------------------------------------- exact JSON encoding of state dicts


def encode_state(obj: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; tensors are moved into ``tensors`` under their dotted path. Tuples, non-string
    keys and tensors become ``{"__tuple__": [...]}``, ``{"__items__": [[k, v], ...]}`` and ``{"__tensor__": name}``
    so that :func:`decode_state` gives back exactly what went in."""
    where = ".".join(path)
    if isinstance(obj, torch.Tensor):
        if where in tensors:
            raise CheckpointError(f"two tensors would be stored as {where!r} (keys 1 and '1' in one dict?)")
        tensors[where] = obj
        return {"__tensor__": where}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, [*path, str(i)], tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, [*path, str(i)], tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: encode_state(v, [*path, k], tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            no_tensors: dict[str, torch.Tensor] = {}
            key = encode_state(k, [*path, "<key>"], no_tensors)
            if no_tensors:
                raise CheckpointError(f"{where or '<root>'}: tensor used as a dict key cannot be stored")
            items.append([key, encode_state(v, [*path, str(k)], tensors)])
        return {"__items__": items}
    raise CheckpointError(
        f"{where or '<root>'}: a {type(obj).__name__} cannot be stored in a checkpoint "
        "(only tensors, numbers, strings, None, lists, tuples and dicts; nothing is pickled)"
    )


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"tensor {value!r} is referenced by {STATE_FILE} but missing from the files")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(decode_state(v, tensors) for v in value)
        if tag == "__items__":
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


# safetensors' own cap on the JSON header; a larger length field means a foreign or damaged file.
MAX_HEADER_BYTES = 100 * 2**20
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclasses.dataclass
class SafetensorsHeader:
    """What a safetensors file declares, read without touching its data: ``tensors`` maps each name to
    ``(dtype, shape)`` (safetensors' dtype names: F32, BF16, ...), ``metadata`` is the string table."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]


def read_safetensors_header(file: str | Path) -> SafetensorsHeader:
    """The header of a safetensors file, parsed here with bounds (8-byte length, at most 100 MB of JSON) so a
    damaged or foreign file is a one-line error naming it, never a huge allocation or a Rust error.

    Raises:
        CheckpointError: the file is not a well-formed safetensors file; the message names it and what is wrong.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, less than its 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(
                f"{file}: not a safetensors file, or a damaged one: its header length field says {length:,} bytes, "
                f"{'more than the file holds' if 8 + length > size else 'more than safetensors allows'} "
                f"(file size {size:,} bytes)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a safetensors file, or a damaged one: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: safetensors __metadata__ is not a table of strings")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        )
        if not ok:
            raise CheckpointError(f"{file}: tensor {name!r}: malformed safetensors entry {str(entry)[:200]}")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        # Sub-byte and newer dtypes (F4, F8_E8M0, ...) are left to safetensors; their sizes are not checked here.
        nbytes = numel * SAFETENSORS_DTYPES.get(dtype, 0) if dtype in SAFETENSORS_DTYPES else end - begin
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise CheckpointError(
                f"{file}: tensor {name!r} ({dtype} {shape}) has data offsets {offsets} that do not fit its size or "
                f"the file's {data_size:,} data bytes: the file is damaged or truncated"
            )
        tensors[name] = (dtype, tuple(shape))
    return SafetensorsHeader(tensors, metadata)


def read_tensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file written with an ``aliases`` entry in its metadata (tied weights are stored
    once; their other names come back pointing at the same tensor). The header is checked first
    (:func:`read_safetensors_header`): a damaged file is a CheckpointError naming it."""
    read_safetensors_header(file)
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        out = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


# --------------------------------------------------------------------------- the marker and the latest rule


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is meant as a checkpoint directory (holds the marker), complete or not."""
    return (Path(path) / STATE_FILE).is_file()


def read_train_state(path: str | Path) -> dict:
    """``train_state.json`` of a checkpoint, after checking every file it lists is present at its size.

    Raises:
        CheckpointError: not a directory, no marker, a foreign or newer format, or a listed file missing or
            truncated (the message names it).
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not state_file.is_file():
        raise CheckpointError(f"{path}: {STATE_FILE} is missing (not a complete vlkit checkpoint)")
    try:
        info = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{state_file}: not a vlkit checkpoint (format={found!r})")
    if info.get("version", 0) > VERSION:
        raise CheckpointError(f"{state_file}: checkpoint version {info['version']} is newer than this vlkit's")
    for name, size in info.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes, {size} expected (truncated?)")
    return info


def is_complete(path: str | Path) -> bool:
    try:
        read_train_state(path)
    except (CheckpointError, OSError):
        return False
    return True


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Complete ``step_*`` checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_pointer(directory: str | Path) -> str | None:
    """The checkpoint name ``directory/latest`` holds, or None (absent, unreadable, or not a ``step_*`` name, so a
    pointer can never lead outside the directory)."""
    try:
        name = (Path(directory) / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if STEP_DIR.fullmatch(name) else None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if that is missing or incomplete, the newest complete one; else None."""
    directory = Path(directory)
    name = read_pointer(directory)
    if name is not None:
        path = directory / name
        if is_complete(path):
            return path
        pointer = directory / LATEST_FILE
        log.warning("%s names %s, which is missing or incomplete; using the newest complete one", pointer, name)
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def _is_checkpoints_folder(path: Path) -> bool:
    return (path / LATEST_FILE).is_file() or any(STEP_DIR.fullmatch(p.name) and p.is_dir() for p in path.iterdir())


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a run directory or a checkpoints folder stands for: its latest complete one (the rule of
    :func:`latest_checkpoint`). None when ``path`` is neither (a model or checkpoint directory, a file, ...).

    Raises:
        CheckpointError: ``path`` holds checkpoints but none is complete (the message says what was found).
    """
    path = Path(path)
    if not path.is_dir() or is_checkpoint(path):
        return None
    for folder in (path, path / CHECKPOINTS_DIR):
        if not folder.is_dir() or not _is_checkpoints_folder(folder):
            continue
        found = latest_checkpoint(folder)
        if found is not None:
            return found
        name = read_pointer(folder)
        why = ""
        if name is not None:
            try:
                read_train_state(folder / name)
            except CheckpointError as e:
                why = f" ({LATEST_FILE} names {name}: {e})"
        raise CheckpointError(f"{folder}: no complete checkpoint{why}")
    return None


# --------------------------------------------------------------------------- DCP without unrestricted unpickling


_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's ``.metadata`` is made of: its own dataclasses and enums, torch sizes/dtypes, paths."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        # Only modules DCP has already imported: the pickle must not be able to trigger imports.
        if module.startswith("torch.distributed.checkpoint") and module in sys.modules:
            obj = getattr(sys.modules[module], name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


def safe_reader(path: str | Path):
    """A DCP FileSystemReader that vets ``.metadata`` before DCP unpickles it (version-independent: DCP's own
    ``read_metadata`` signature changed across releases, so the check runs first and then defers to it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            for file in sorted(Path(path).glob("*.metadata")) + sorted(Path(path).glob(".metadata")):
                with open(file, "rb") as f:
                    try:
                        metadata = MetadataUnpickler(f).load()
                    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                        raise CheckpointError(f"{file}: not a DCP metadata file vlkit will read ({e})") from None
                if not isinstance(metadata, Metadata):
                    raise CheckpointError(f"{file}: holds a {type(metadata).__name__}, not DCP metadata")
                bad = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
                if bad:
                    # DCP reads non-tensor entries with torch.load(weights_only=False); vlkit never writes any.
                    raise CheckpointError(f"{file}: non-tensor entries {bad[:5]} refused (they would be unpickled)")
            return super().read_metadata(*args, **kwargs)

    return SafeReader(str(path))


def tensor_only_planner():
    """DCP's default load planner, except that it refuses to unpickle a non-tensor ("bytes") entry."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError(f"refusing to unpickle non-tensor checkpoint entry {read_item.dest_index.fqn!r}")

    return TensorOnlyLoadPlanner()


@contextlib.contextmanager
def single_process_dcp_ok():
    """DCP warns when used without a process group; here that is deliberate (the sharded format in one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is .*(unavailable|uninitialized)")
        yield


def _load_in_this_process(state: dict[str, torch.Tensor], reader: Any) -> None:
    """``dcp.load`` in this process alone, even where a process group exists (one rank of an evaluation may load a
    model while the others do not: no collective may run). torch releases before ``dcp.load`` took ``no_dist``
    reach the same code through its internal loader."""
    import torch.distributed.checkpoint as dcp

    planner = tensor_only_planner()
    with single_process_dcp_ok():
        if "no_dist" in inspect.signature(dcp.load).parameters:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
        else:  # pragma: no cover - torch < 2.7
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)


# --------------------------------------------------------------------------- a checkpoint's model, consolidated


def read_model_state(path: str | Path, info: dict | None = None) -> dict[str, torch.Tensor]:
    """The model tensors of a complete checkpoint as full CPU tensors (clean names, as ``model.state_dict()``).

    Single format: ``model.safetensors``. Sharded format (FSDP2 / tensor parallel, any world size): every
    ``model.*`` entry is allocated at its global size and dtype from the vetted DCP metadata and filled by DCP in
    this process, without a process group; the optimizer's entries are not read. A partial checkpoint
    (``partial_model``) gives the entries it holds.

    Raises:
        CheckpointError: incomplete or foreign (naming the file), or without model tensors.
    """
    path = Path(path)
    info = read_train_state(path) if info is None else info
    if info.get("kind") != "sharded":
        if MODEL_FILE not in info.get("files", {}):
            raise CheckpointError(f"{path}: holds no {MODEL_FILE}")
        return read_tensors(path / MODEL_FILE)
    reader = safe_reader(path)
    entries = reader.read_metadata().state_dict_metadata
    state = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in entries.items()
        if k.startswith(MODEL_PREFIX)
    }
    if not state:
        raise CheckpointError(f"{path}: the sharded checkpoint holds no model tensors")
    _load_in_this_process(state, reader)
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items()}


def run_model_config(info: dict) -> dict | None:
    """The ``model`` section of the run config the trainer stores in ``train_state.json`` (``state.config``), or
    None. A fallback for checkpoints without ``config.json``: for NeVA it is the config as given, before the
    pretrained parts it names were read."""
    state = info.get("state")
    config = state.get("config") if isinstance(state, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    return decode_state(model, {}) if isinstance(model, dict) else None
