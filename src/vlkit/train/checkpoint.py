"""Training checkpoints: model, optimizer, scheduler, step, data position and RNG, written atomically.

Layout of a checkpoint directory ``DIR/step_{step:08d}/``:

- single process (or DDP, written by rank 0): ``model.safetensors`` (``_orig_mod.`` prefixes stripped, the same
  file a vlkit model directory holds, with ``config.json`` beside it when the model was built by
  ``vlkit.create_model``), ``optimizer.safetensors`` (every tensor of ``optimizer.state_dict()`` under its path,
  e.g. ``state.3.exp_avg``), ``rng_rank{r:05d}.json`` per rank and ``train_state.json``;
- sharded (FSDP2 / tensor parallel): ``torch.distributed.checkpoint`` files (``.metadata`` + ``__*.distcp``) holding
  the model and optimizer tensors, ``rng_rank{r:05d}.json`` written by each rank, ``config.json`` (as above) and
  ``train_state.json``.

Either format is also a model: ``vlkit.load_model`` consolidates a sharded one into full tensors in one process
(:mod:`vlkit.interop.checkpoint_files`, which holds the reading side of this format: the marker and completeness
check, the ``latest`` rule and the vetted DCP reader).

A run may save part of its model (``model_keys``: NeVA's stage 1 writes the projector, not the frozen pretrained
towers its config names); ``train_state.json`` then says ``"partial_model": true`` and loading needs the same keys.

``train_state.json`` is the marker and table of contents: format, step, the sizes of every other file (a checkpoint
is complete only when all are present at their size), the optimizer's non-tensor state and param-group
hyper-parameters, the scheduler's state and the caller's ``state``. Tensors found inside those (rare: an ``lr``
tensor, a tensor in ``state``) go to ``extra.safetensors``. Tuples, non-string keys and tensors are written as
``{"__tuple__": [...]}``, ``{"__items__": [[k, v], ...]}`` and ``{"__tensor__": name}`` so that a state dict comes
back exactly as it went in.

A checkpoint is built in a temporary directory, fsynced and renamed into place; only then is ``DIR/latest`` (one
line: the directory's name) replaced, by rename. Killing the process at any moment leaves ``latest`` on a complete
checkpoint, and :meth:`CheckpointManager.latest` skips a pointer whose target is missing or incomplete.

Nothing is unpickled when loading: safetensors and JSON for the single format; for the sharded format DCP reads
tensors with ``torch.load(weights_only=True)``, while its ``.metadata`` file is a pickle that DCP itself loads with
an unrestricted ``pickle.load``. So a sharded checkpoint is read only from a directory carrying our marker, its
metadata is first checked by an unpickler that admits only DCP's own metadata classes, and entries that DCP would
read with ``torch.load(weights_only=False)`` (non-tensor "bytes" items, which we never write) are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from vlkit import __version__
from vlkit.interop.checkpoint_files import (
    FORMAT,
    LATEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    VERSION,
    CheckpointError,
    complete_checkpoints,
    decode_state,
    encode_state,
    is_complete,
    latest_checkpoint,
    read_pointer,
    read_tensors,
    read_train_state,
    safe_reader,
    single_process_dcp_ok,
    tensor_only_planner,
)
from vlkit.interop.files import CONFIG_FILE, atomic_write_dir, clean_state_dict, dedupe
from vlkit.interop.files import FORMAT as MODEL_FORMAT
from vlkit.train.rng import capture_rng_state, restore_rng_state
from vlkit.utils.fs import write_synced, write_text_durably
from vlkit.utils.modules import is_sharded, unwrap

__all__ = ["CheckpointError", "CheckpointManager", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

OPTIM_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
# Leftovers of interrupted saves/prunes: atomic_write_dir's ".NAME.tmp-*" / ".NAME.old-PID", our staging and
# deletion directories, and the pointer's temporary file.
_LEFTOVER = re.compile(r"\.(step_\d{8,})\.(tmp-.*|old-\d+|partial|deleting)|\.latest\.tmp-\d+")


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.json"


# --------------------------------------------------------------------------- small file helpers


def _save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    unique, aliases = dedupe(tensors)
    save_file(unique, str(file), metadata={"format": "pt", "aliases": json.dumps(aliases)})


# --------------------------------------------------------------------------- models, wrappers and DTensors


def _has_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether DCP's state-dict helpers may be used: on an optimizer without state they first run a zero-lr
    ``step()`` to create it, which advances Adam's step counters and would change the run being saved or resumed.
    Stateless optimizers are saved and loaded by plain ``state_dict()`` / ``load_state_dict()`` instead."""
    return optimizer is not None and bool(optimizer.state)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """Parameter name of each optimizer index, in ``optimizer.state_dict()`` numbering."""
    names = {id(p): n.replace("_orig_mod.", "") for n, p in model.named_parameters()}
    return [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]


def _fqn_to_index(osd: dict) -> tuple[dict, list[str]]:
    """DCP's name-keyed optimizer state dict in ``Optimizer.state_dict()``'s index numbering, and the names."""
    names = [n for group in osd["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}, names


def _index_to_fqn(osd: dict, names: list[str | None], path: Path) -> dict:
    if any(n is None for n in names):
        raise CheckpointError(f"{path}: optimizer parameters without names cannot be loaded into a sharded model")
    state = {names[i]: s for i, s in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _select(state: dict[str, Any], keys: set[str] | None) -> dict[str, Any]:
    """The entries of ``state`` named in ``keys`` (all of them for None)."""
    return dict(state) if keys is None else {k: v for k, v in state.items() if k in keys}


def _check_model_fits(path: Path, saved: dict[str, tuple], current: dict[str, tuple]) -> None:
    """Raise naming every parameter whose presence or shape differs (before anything is copied)."""
    problems = [
        f"{k}: checkpoint {tuple(saved[k])}, model {tuple(current[k])}"
        for k in sorted(saved.keys() & current.keys())
        if tuple(saved[k]) != tuple(current[k])
    ]
    missing = sorted(current.keys() - saved.keys())
    unexpected = sorted(saved.keys() - current.keys())
    parts = []
    if problems:
        parts.append("shape mismatch for " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    if missing:
        parts.append(f"missing from the checkpoint: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        parts.append(f"not in the model: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
    if parts:
        raise CheckpointError(f"{path}: the model does not fit the checkpoint: " + " | ".join(parts))


def _check_optimizer_fits(path: Path, saved: list | None, current: list) -> None:
    """Optimizer state is keyed by position: the same positions must hold the same parameters."""
    if saved is None or saved == current:
        return
    n = max(len(saved), len(current))
    saved, current = saved + ["<none>"] * (n - len(saved)), current + ["<none>"] * (n - len(current))
    i = next(i for i in range(n) if saved[i] != current[i])
    raise CheckpointError(
        f"{path}: the optimizer's parameters differ from the checkpoint's: position {i} holds {saved[i]!r} there "
        f"and {current[i]!r} here"
    )


def _model_config(model: nn.Module) -> dict | None:
    from vlkit.models.factory import model_config_dict

    try:
        return model_config_dict(model)
    except TypeError:  # not built by create_model: the checkpoint still works, just not as a model directory
        return None


def _write_model_config(directory: Path, config: dict) -> None:
    """The ``config.json`` of a vlkit model directory, so that a checkpoint names its architecture."""
    model_dir = {"format": MODEL_FORMAT, "vlkit_version": __version__, "model": config}
    (directory / CONFIG_FILE).write_text(json.dumps(model_dir, indent=2))


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run in ``directory``.

    One manager per run and directory; with several processes every rank builds one with the same directory, which
    must be on a filesystem all ranks share. ``save`` and ``load`` are collective when ``torch.distributed`` is
    initialised with more than one process: every rank calls them.

    Args:
        directory: where ``step_{step:08d}/`` directories and the ``latest`` pointer live.
        keep_last: complete checkpoints to keep (the newest by step, plus whatever ``latest`` names);
            0 keeps all.
        rank: this process's global rank (must match ``torch.distributed`` when it is initialised).
        world_size: number of processes (likewise).
    """

    def __init__(self, directory: str | Path, keep_last: int = 2, rank: int = 0, world_size: int = 1):
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ----------------------------------------------------------------- finding checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in the directory, oldest step first."""
        return complete_checkpoints(self.directory)

    def _pointer(self) -> str | None:
        return read_pointer(self.directory)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if that is missing or incomplete, the newest complete one; else None
        (the rule every model loader follows too: :func:`vlkit.interop.checkpoint_files.latest_checkpoint`)."""
        return latest_checkpoint(self.directory)

    def _resolve(self, path: str | Path | None) -> Path:
        if path is None or str(path) == "latest":
            found = self.latest()
            if found is None:
                raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
            return found
        path = Path(path)
        if not path.exists() and (self.directory / path).exists():
            path = self.directory / path
        return path

    # ----------------------------------------------------------------- distributed helpers

    def _distributed(self) -> bool:
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if active and (self.rank, self.world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(
                f"CheckpointManager(rank={self.rank}, world_size={self.world_size}) but torch.distributed has "
                f"rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        if not active and self.world_size > 1:
            raise ValueError(f"world_size={self.world_size} but torch.distributed is not initialised")
        return active

    @staticmethod
    def _device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _agree(self, ok: bool) -> bool:
        """Barrier that also tells every rank whether all ranks succeeded (so a failure never leaves one hanging)."""
        if not self._distributed():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON) on every rank, through tensors rather than pickled objects."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self._device())
        sizes = [torch.zeros(1, dtype=torch.int64, device=data.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=data.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=data.device)
        padded[: data.numel()] = data
        chunks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(chunks, padded)
        return [json.loads(bytes(c[: int(s.item())].cpu().tolist())) for c, s in zip(chunks, sizes)]

    def _collective(self, ok: bool, error: BaseException | None, what: str) -> None:
        if not self._agree(ok):
            raise error if error is not None else CheckpointError(f"{what} failed on another rank")

    # ----------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        state: dict | None = None,
        sharded: bool | None = None,
        model_keys: Collection[str] | None = None,
    ) -> Path:
        """Write ``DIR/step_{step:08d}/`` atomically, then point ``DIR/latest`` at it, then prune.

        Collective when distributed. Each rank's global RNG states are stored and restored by :meth:`load`.

        Args:
            step: the optimizer step this checkpoint follows (names the directory).
            model: the model, possibly wrapped by DDP or ``torch.compile``, or sharded by FSDP2 / tensor parallel.
            optimizer: its optimizer, or None.
            scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``), or None.
            state: JSON-able dict of everything else needed to resume (data position, counters, config); tensors,
                tuples and non-string keys are allowed and come back as they went in.
            sharded: True writes DCP shards from every rank; False writes the single-process format from rank 0
                (gathering DTensor parameters first); None chooses sharded exactly when distributed with
                DTensor parameters (FSDP2 / TP), so DDP models take the single format.
            model_keys: the model state entries to write (clean names, as ``model.safetensors`` holds them); None:
                all. A partial checkpoint (NeVA's stage 1 keeps its projector, not the frozen pretrained towers the
                config names) is marked so; :meth:`load` then needs the same ``model_keys``.

        Returns:
            The checkpoint directory.
        """
        distributed = self._distributed()
        target_model = unwrap(model)
        has_dtensor = is_sharded(target_model)
        if sharded is None:
            sharded = distributed and has_dtensor
        target = self.directory / f"step_{step:08d}"

        # Everything that might refuse to serialise is encoded before any file is written.
        extra: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "sharded" if sharded else "single",
            "step": step,
            "world_size": self.world_size,
            "vlkit_version": __version__,
            "torch_version": torch.__version__,
            "scheduler": encode_state(scheduler.state_dict(), ["scheduler"], extra) if scheduler is not None else None,
            "state": encode_state(dict(state or {}), ["state"], extra),
            "partial_model": model_keys is not None,
        }
        json.dumps(info)
        keys = None if model_keys is None else set(model_keys)
        rng = capture_rng_state()

        if sharded:
            self._save_sharded(target, target_model, optimizer, info, extra, rng, keys)
        else:
            self._save_single(target, target_model, optimizer, info, extra, rng, distributed, has_dtensor, keys)
        return target

    def _save_single(self, target, model, optimizer, info, extra, rng, distributed, has_dtensor, keys) -> None:
        rngs = self._gather_json(rng) if distributed else [rng]
        if distributed and has_dtensor:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            if _has_state(optimizer):
                msd, osd = get_state_dict(model, optimizer, options=full)  # full tensors on rank 0 only
                osd, names = _fqn_to_index(osd) if self.rank == 0 else (None, None)
            else:
                msd = get_model_state_dict(model, options=full)
                osd = optimizer.state_dict() if optimizer is not None else None
                names = _param_names(model, optimizer) if optimizer is not None else None
        else:
            msd = clean_state_dict(model)
            osd = optimizer.state_dict() if optimizer is not None else None
            names = _param_names(model, optimizer) if optimizer is not None else None
        msd = _select(msd, keys)

        error = None
        if self.rank == 0:
            try:
                optim_tensors: dict[str, torch.Tensor] = {}
                info["optimizer"] = encode_state(osd, [], optim_tensors) if osd is not None else None
                info["param_names"] = names
                config = _model_config(model)

                def write(tmp: Path) -> None:
                    _save_tensors(msd, tmp / MODEL_FILE)
                    if osd is not None:
                        _save_tensors(optim_tensors, tmp / OPTIM_FILE)
                    if extra:
                        _save_tensors(extra, tmp / EXTRA_FILE)
                    if config is not None:
                        _write_model_config(tmp, config)
                    for r, s in enumerate(rngs):
                        (tmp / _rng_file(r)).write_text(json.dumps(s))
                    self._write_state(tmp, info)

                atomic_write_dir(target, write)
                self._publish(target)
            except BaseException as e:
                error = e
        self._collective(error is None, error, f"saving {target}")

    def _save_sharded(self, target, model, optimizer, info, extra, rng, keys) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        flat: dict[str, torch.Tensor] = {}
        if _has_state(optimizer):
            msd, osd = get_state_dict(model, optimizer)
            optim_skeleton = encode_state(osd, ["optim"], flat)
        else:
            msd = get_model_state_dict(model)
            optim_skeleton = None
            if optimizer is not None:
                optim_skeleton = encode_state(optimizer.state_dict(), ["optimizer"], extra)
        for k, v in _select(msd, keys).items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"model state {k!r} is a {type(v).__name__}; only tensors can be sharded")
            flat[f"model.{k}"] = v

        staging = self.directory / f".{target.name}.partial"
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except BaseException as e:
                error = e
        self._collective(error is None, error, f"preparing {staging}")

        with single_process_dcp_ok():
            dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(staging)))
        try:
            write_synced(staging / _rng_file(self.rank), json.dumps(rng))
        except BaseException as e:
            error = e
        self._collective(error is None, error, f"writing RNG state to {staging}")

        if self.rank == 0:
            try:
                info["optimizer"] = optim_skeleton
                info["param_names"] = None
                config = _model_config(model)

                def adopt(tmp: Path) -> None:
                    # Shards were written by every rank into `staging`; moving them keeps the one rename that
                    # publishes the directory, done by atomic_write_dir.
                    for f in staging.iterdir():
                        os.replace(f, tmp / f.name)
                    if extra:
                        _save_tensors(extra, tmp / EXTRA_FILE)
                    if config is not None:  # the architecture, so the checkpoint loads as a model on its own
                        _write_model_config(tmp, config)
                    self._write_state(tmp, info)

                atomic_write_dir(target, adopt)
                shutil.rmtree(staging, ignore_errors=True)
                self._publish(target)
            except BaseException as e:
                error = e
        self._collective(error is None, error, f"saving {target}")

    def _write_state(self, tmp: Path, info: dict) -> None:
        """The marker goes last: it lists every other file with its size."""
        # mkdtemp makes the directory private (0700); other readers of the run (eval jobs, colleagues) need the
        # permissions the run directory itself was given.
        os.chmod(tmp, self.directory.stat().st_mode & 0o777)
        info["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=1))

    def _publish(self, target: Path) -> None:
        """Point ``latest`` at a complete, fsynced ``target`` (by rename), then prune."""
        write_text_durably(self.directory / LATEST_FILE, target.name + "\n")
        try:
            self._prune()
        except OSError as e:  # the new checkpoint is safe; an old one lingering is not worth failing the run for
            log.warning("pruning %s failed: %s", self.directory, e)

    def _prune(self) -> None:
        latest = self._pointer()
        complete = self.checkpoints()
        if self.keep_last > 0:
            for path in complete[: -self.keep_last]:
                if path.name != latest:
                    # Rename first, so an interrupted delete leaves a leftover, not a half checkpoint under its name.
                    doomed = path.with_name(f".{path.name}.deleting")
                    os.replace(path, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
        for p in self.directory.iterdir():
            m = _LEFTOVER.fullmatch(p.name)
            if m is None:
                continue
            if m.group(2) and m.group(2).startswith("old-") and not is_complete(self.directory / m.group(1)):
                continue  # the only copy of a checkpoint whose re-save was interrupted between two renames
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # ----------------------------------------------------------------- loading

    def load(
        self,
        path: str | Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        model_keys: Collection[str] | None = None,
    ) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG states from a checkpoint.

        Collective for sharded checkpoints. Shapes are checked before anything is copied, so a mismatch leaves the
        model untouched. Either format loads into plain, DDP, compiled or FSDP2/TP models (sharded checkpoints
        reshard across world sizes; per-rank RNG states are restored only where the rank existed at save time).

        Args:
            path: a checkpoint directory (absolute, or a name inside the manager's directory), or None /
                ``"latest"`` for :meth:`latest`.
            model: the model to load into.
            optimizer: its optimizer (required to hold the same parameters in the same order), or None to skip.
            scheduler: the scheduler to restore, or None to skip.
            model_keys: restore only these model state entries (the rest stays as the model was built); required
                for a partial checkpoint (see :meth:`save`), which must then hold exactly these.

        Returns:
            The ``state`` dict given to :meth:`save`.

        Raises:
            FileNotFoundError: ``latest`` was asked for and there is no complete checkpoint.
            CheckpointError: the checkpoint is incomplete (naming the missing file), foreign, or does not fit the
                model (naming the parameter).
        """
        path = self._resolve(path)
        info = read_train_state(path)
        self._distributed()
        target_model = unwrap(model)
        if optimizer is not None and info.get("optimizer") is None:
            raise CheckpointError(f"{path}: holds no optimizer state")
        if scheduler is not None and info.get("scheduler") is None:
            raise CheckpointError(f"{path}: holds no scheduler state")
        if info.get("partial_model") and model_keys is None:
            raise CheckpointError(
                f"{path}: holds part of the model only (the rest comes from the pretrained parts its config names); "
                "resume it with the same run config, or load it as a model with vlkit.load_model"
            )
        keys = None if model_keys is None else set(model_keys)
        extra = read_tensors(path / EXTRA_FILE) if EXTRA_FILE in info["files"] else {}
        if optimizer is not None:
            _check_optimizer_fits(path, info.get("param_names"), _param_names(target_model, optimizer))
        stateless = None
        if optimizer is not None and not info["optimizer"].get("state"):
            # Saved before the first step: plain load_state_dict, never DCP's helpers (see _has_state).
            stateless, optimizer = optimizer, None
        if info["kind"] == "sharded":
            self._load_sharded(path, info, target_model, optimizer, keys)
        else:
            self._load_single(path, info, target_model, optimizer, keys)
        if stateless is not None:
            tensors = read_tensors(path / OPTIM_FILE) if OPTIM_FILE in info["files"] else {}
            stateless.load_state_dict(decode_state(info["optimizer"], {**extra, **tensors}))
        if scheduler is not None:
            scheduler.load_state_dict(decode_state(info["scheduler"], extra))
        rng_file = path / _rng_file(self.rank)
        if rng_file.is_file():
            restore_rng_state(json.loads(rng_file.read_text()))
        else:
            warnings.warn(f"{path}: no RNG state for rank {self.rank}; random streams will differ", stacklevel=2)
        return decode_state(info["state"], extra)

    def _load_single(self, path: Path, info: dict, model: nn.Module, optimizer, keys: set[str] | None) -> None:
        weights = _select(read_tensors(path / MODEL_FILE), keys)
        current = model.state_dict()
        clean_to_actual = _select({k.replace("_orig_mod.", ""): k for k in current}, keys)
        _check_model_fits(
            path, {k: v.shape for k, v in weights.items()}, {c: current[a].shape for c, a in clean_to_actual.items()}
        )
        osd = None
        if optimizer is not None:
            osd = decode_state(info["optimizer"], read_tensors(path / OPTIM_FILE))
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, strict=keys is None)
            set_model_state_dict(model, weights, options=full)
            if osd is not None:
                set_optimizer_state_dict(model, optimizer, _index_to_fqn(osd, info["param_names"], path), options=full)
            return
        model.load_state_dict({clean_to_actual[k]: v for k, v in weights.items()}, strict=keys is None)
        if osd is not None:
            optimizer.load_state_dict(osd)

    def _load_sharded(self, path: Path, info: dict, model: nn.Module, optimizer, keys: set[str] | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        reader = safe_reader(path)
        saved = reader.read_metadata().state_dict_metadata
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
        else:
            msd, osd = get_model_state_dict(model), None
        msd = _select(msd, keys)
        saved_model = _select({k[len("model.") :]: md.size for k, md in saved.items() if k.startswith("model.")}, keys)
        _check_model_fits(path, saved_model, {k: v.shape for k, v in msd.items()})
        flat = {f"model.{k}": v for k, v in msd.items()}
        if osd is not None:
            encode_state(osd, ["optim"], flat)
            missing = sorted(k for k in flat if k not in saved)
            if missing:
                raise CheckpointError(f"{path}: optimizer state missing from the checkpoint: {missing[:5]}")
        with single_process_dcp_ok():
            # DCP copies into `flat`'s tensors in place: the (sharded) parameters and optimizer state themselves.
            dcp.load(flat, storage_reader=reader, planner=tensor_only_planner())
        options = StateDictOptions(strict=keys is None)
        if osd is None:
            set_model_state_dict(model, msd, options=options)
            return
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=decode_state(info["optimizer"], flat),
                       options=options)  # fmt: skip
