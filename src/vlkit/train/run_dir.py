"""One run per output directory: a lock file, the refusal to mix a fresh run into another run's files, moving an old
run aside on request, and the run's resolved ``config.yaml``.

The lock is ``<output_dir>/run.lock``, a JSON file naming its holder (pid, host, start time). It is created by hard-
linking a complete temporary file to that name, which fails when the name exists (atomic on local filesystems and on
NFS), so a reader never sees a half-written lock. Rank 0 of a run takes it and releases it when the run ends (also on
an exception, and at interpreter exit); other ranks never touch it.

When the lock exists its holder is judged:

- same host, and the pid is gone (or now belongs to a process started later: the pid was reused): a run that was
  killed (SIGKILL, OOM killer, preemption). The lock is stale and taken over, with a warning.
- same host and the same process (an earlier ``Trainer`` in this interpreter that never released it): taken over.
- same host, the process alive: in use; the new run exits 2 naming the holder.
- another host: vlkit cannot see that host's processes, so it never takes the lock over by itself. The run exits 2,
  naming the holder and the lock file to delete once that run is known to be dead.

A run that starts at step 0 (no ``trainer.checkpoint.resume``, or ``weights_only``) in a directory holding another
run's checkpoints or metrics exits 2 with the three ways on: continue it (``trainer.checkpoint.resume=latest``), use
another ``trainer.output_dir``, or ``trainer.overwrite=true``, which moves the old run's files into the sibling
``<output_dir>.old-<time>`` (and a checkpoint directory outside ``output_dir`` to ``<dir>.old-<time>``), never
deleting or mixing them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlkit.config.load import ConfigError, to_yaml
from vlkit.config.schema import Config
from vlkit.utils.fs import write_text_durably

__all__ = ["CONFIG_FILE", "LOCK_FILE", "RunLock", "acquire_lock", "checkpoint_dir", "claim_output_dir", "on_rank0"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
T = TypeVar("T")


def checkpoint_dir(cfg: Config) -> Path:
    """Where the run's checkpoints go: ``trainer.checkpoint.dir``, or ``<output_dir>/checkpoints``."""
    tcfg = cfg.trainer
    return Path(tcfg.checkpoint.dir) if tcfg.checkpoint.dir else Path(tcfg.output_dir) / "checkpoints"


# --------------------------------------------------------------------------- rank 0 decides, every rank follows


def on_rank0(fn: Callable[[], T], rank: int, world_size: int) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; when it raises, every rank raises.

    Rank 0 re-raises its own exception; the other ranks raise :class:`ConfigError` with the same text for a config
    error, a ``RuntimeError`` naming rank 0 for anything else. So all ranks leave together, with one message, instead
    of some waiting forever in the next collective.
    """
    distributed = world_size > 1
    if distributed:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return fn() if rank == 0 else None  # type: ignore[return-value]
    result: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if rank == 0:
        try:
            result = ("ok", fn())
        except BaseException as e:  # re-raised below, once the peers were told
            error = e
            result = ("config", str(e)) if isinstance(e, ConfigError) else ("error", f"{type(e).__name__}: {e}")
    box = [result]
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if error is not None:
        raise error
    if kind == "config":
        raise ConfigError(payload)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {payload}")
    return payload


# --------------------------------------------------------------------------- the lock


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/PID/stat`` (Linux; None elsewhere or when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after its closing ')' are fixed.
    return stat.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks after boot, to tell a reused pid from the lock's holder."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc to ask: trust the signal
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return start is None or fields[19] == start


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _remove_if_ours(path: Path, token: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        holder = json.loads(path.read_text())
        if isinstance(holder, dict) and holder.get("token") == token:
            path.unlink()


@dataclass
class RunLock:
    """The output directory as claimed by one run; :meth:`release` gives the lock back (idempotent).

    ``path`` is the lock file on rank 0 and None on other ranks (and after release). ``moved`` lists what
    ``trainer.overwrite`` moved aside, as (old place, new place) pairs, on every rank.
    """

    path: Path | None
    token: str = ""
    moved: list[tuple[Path, Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Released when the run ends normally, when the object is collected, and at interpreter exit.
        self._finalizer = weakref.finalize(self, _remove_if_ours, self.path, self.token) if self.path else None

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self.path = None

    def relocate(self, path: Path) -> Path:
        """Where ``path`` is now, if it was under something that was moved aside."""
        path = Path(path)
        for old, new in self.moved:
            try:
                return new / path.resolve().relative_to(old.resolve())
            except ValueError:
                continue
        return path


def acquire_lock(directory: str | Path) -> RunLock:
    """Take ``<directory>/run.lock`` for this process, taking over a stale one.

    Raises:
        ConfigError: the directory is in use by a live run (or by one on another host), naming the holder.
    """
    directory = Path(directory)
    lock = directory / LOCK_FILE
    token = uuid.uuid4().hex
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "process_start": _process_start(os.getpid()),
        "token": token,
    }
    tmp = directory / f".{LOCK_FILE}.{token}"
    with open(tmp, "w") as f:
        f.write(json.dumps(holder))
        f.flush()
        os.fsync(f.fileno())
    try:
        for _ in range(5):  # a stale lock taken over by a competitor in between sends us round again
            try:
                os.link(tmp, lock)
                return RunLock(lock, token)
            except FileExistsError:
                pass
            try:
                other = _read_holder(lock)
            except FileNotFoundError:
                continue  # released in between
            _check_stale(lock, other)
            # Stale: move it out of the way under a private name, then make sure it was the one judged stale (a
            # competitor may have replaced it with a live lock in the meantime: that one is put back).
            grave = directory / f".{LOCK_FILE}.stale-{token}"
            try:
                os.rename(lock, grave)
            except FileNotFoundError:
                continue
            if _read_holder(grave) != other:
                with contextlib.suppress(FileExistsError):
                    os.link(grave, lock)
                grave.unlink()
                continue
            grave.unlink()
            log.warning("%s: took over a stale lock (%s, no longer running)", lock, _describe(other or {}))
        raise ConfigError(f"could not take the lock {lock}: other runs keep taking it over; try again")
    finally:
        tmp.unlink(missing_ok=True)


def _check_stale(lock: Path, holder: dict | None) -> None:
    """Return when ``holder``'s lock may be taken over; raise naming the holder otherwise."""
    out = lock.parent
    if holder is None or not isinstance(holder.get("pid"), int):
        raise ConfigError(
            f"trainer.output_dir={out} has an unreadable lock file {lock}: if no run is using the directory, "
            "delete that file"
        )
    if holder.get("host") != socket.gethostname():
        raise ConfigError(
            f"trainer.output_dir={out} is in use by another run ({_describe(holder)}); vlkit cannot check from "
            f"here whether that run is still alive: if it is not, delete {lock}, or choose another trainer.output_dir"
        )
    pid = holder["pid"]
    if pid == os.getpid() and holder.get("process_start") == _process_start(pid):
        return  # an earlier Trainer of this very process that never released it: runs in one process are sequential
    if _alive(pid, holder.get("process_start")):
        raise ConfigError(
            f"trainer.output_dir={out} is in use by another run ({_describe(holder)}): wait for it to end, or "
            f"choose another trainer.output_dir (lock: {lock})"
        )


# --------------------------------------------------------------------------- another run's files


def _previous_run(out: Path, ckpt: Path) -> list[str]:
    """What in ``out`` (and the checkpoint directory) belongs to a run: empty when there is nothing."""
    from vlkit.interop.checkpoint_files import complete_checkpoints

    found = []
    checkpoints = complete_checkpoints(ckpt)
    if checkpoints:
        found.append(f"checkpoints up to {checkpoints[-1].name} in {ckpt}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    tb = out / "tb"
    if tb.is_dir() and any(tb.iterdir()):
        found.append("TensorBoard events in tb/")
    return found


def _aside(path: Path, stamp: str) -> Path:
    """A new sibling name ``<path>.old-<stamp>`` (``-2``, ``-3`` ... when taken)."""
    candidate, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return candidate


def _move_aside(out: Path, ckpt: Path) -> list[tuple[Path, Path]]:
    """Move the old run's files out of ``out`` (the lock, ours now, stays) and an outside checkpoint directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    old_out = _aside(out, stamp)
    old_out.mkdir(parents=True)
    for entry in sorted(out.iterdir()):
        if entry.name == LOCK_FILE or entry.name.startswith(f".{LOCK_FILE}."):
            continue
        os.rename(entry, old_out / entry.name)  # one rename each: nothing is copied, nothing half-moved
    moved.append((out, old_out))
    if ckpt.is_dir() and not ckpt.resolve().is_relative_to(out.resolve()):
        old_ckpt = _aside(ckpt, stamp)
        os.rename(ckpt, old_ckpt)
        moved.append((ckpt, old_ckpt))
    return moved


def _write_config(out: Path, cfg: Config) -> None:
    """``<output_dir>/config.yaml``: the resolved config, written to a temporary file and renamed into place."""
    write_text_durably(out / CONFIG_FILE, to_yaml(cfg))


def _claim(cfg: Config) -> RunLock:
    tcfg = cfg.trainer
    out = Path(tcfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"trainer.output_dir={out}: cannot create it ({e.strerror or e})") from None
    lock = acquire_lock(out)
    try:
        moved: list[tuple[Path, Path]] = []
        if not tcfg.checkpoint.resume or tcfg.checkpoint.weights_only:  # the run starts at step 0
            ckpt = checkpoint_dir(cfg)
            found = _previous_run(out, ckpt)
            if found and not tcfg.overwrite:
                # weights_only is already a new run: continuing the old one is not what was asked.
                continue_it = (
                    "" if tcfg.checkpoint.weights_only else "continue it with trainer.checkpoint.resume=latest, "
                )
                raise ConfigError(
                    f"trainer.output_dir={out} holds another run ({', '.join(found)}): {continue_it}choose another "
                    f"trainer.output_dir, or pass trainer.overwrite=true to move that run aside to {out}.old-<time>"
                )
            if found:
                moved = _move_aside(out, ckpt)
                print(f"trainer.overwrite: moved the previous run in {out} to {moved[0][1]}", flush=True)
        _write_config(out, cfg)
    except BaseException:
        lock.release()
        raise
    lock.moved = moved
    return lock


def claim_output_dir(cfg: Config, rank: int = 0, world_size: int = 1) -> RunLock:
    """Make ``trainer.output_dir`` this run's: lock it, refuse to mix a fresh run into another run's files (or move
    them aside with ``trainer.overwrite``), and write ``config.yaml``. Collective: rank 0 decides and acts, every rank
    gets the outcome and raises the same :class:`ConfigError` when it is refused.

    Returns:
        The :class:`RunLock`; call :meth:`RunLock.release` when the run ends (rank 0 holds the file).
    """
    held: list[RunLock] = []

    def claim() -> list[tuple[Path, Path]]:
        held.append(_claim(cfg))
        return held[0].moved  # what the other ranks need to know; the lock itself stays with rank 0

    moved = on_rank0(claim, rank, world_size)
    return held[0] if held else RunLock(None, moved=moved or [])
