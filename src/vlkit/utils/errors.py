"""One exception family for a user's mistake, and the classification of the failures that are not bugs.

``vlkit.cli.main`` turns a :class:`UserError` into one line, ``vlkit <command>: error: <message>``, and exit 2; an
environment failure (:func:`environment_failure`: disk full, out of memory, a dead peer) into one paragraph and
exit 1; anything else is a bug and keeps its traceback. The module sits at the bottom of the layers (it imports
nothing of vlkit), so every layer can raise the family without importing the CLI.
"""

from __future__ import annotations

import errno

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# errno values of a full disk or an exhausted quota: the run can go on after space is freed.
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Text of a full disk in errors that lost their errno on the way (safetensors' Rust writer: "... os error 28").
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_OOM_TEXT = ("out of memory", "defaultcpuallocator", "cuda error: out of memory", "failed to allocate")
# Collective-communication failures of a dead or hung peer (torch's DistBackendError, gloo / NCCL timeouts).
_PEER_TYPES = ("DistBackendError", "DistNetworkError", "DistStoreError")
_PEER_TEXT = ("connection reset by peer", "connection closed by peer", "watchdog caught collective operation timeout")


class UserError(Exception):
    """A mistake the user can fix (config, path, file format, data, usage); the message names what it is about.

    Subclasses that existed before the family (``ConfigError``, ``ModelFormatError``, ...) also derive from
    ``ValueError`` so that callers catching ``ValueError`` keep working.
    """


class DataError(UserError, ValueError):
    """A data file or sample that cannot be used (malformed JSON, a CSV without rows); the message names the file,
    and the sample index / id where there is one."""


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, outermost first (cycles cut)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_user_error(exc: BaseException) -> UserError | None:
    """``exc`` or the :class:`UserError` it was raised from (``raise ... from err``): a wrapper must not hide it. An
    exception merely raised *while handling* a user error (``__context__``) is not one: that may be a bug."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def environment_failure(exc: BaseException) -> str | None:
    """What happened, if ``exc`` is a failure of the machine rather than of vlkit or of the user's input.

    Returns a short phrase (``"the disk is full"``) or None for anything else.
    """
    for e in _chain(exc):
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return f"the disk is full ({e.strerror or 'no space left on device'}{_filename(e)})"
        if any(t in text for t in _DISK_FULL_TEXT):
            return f"the disk is full ({str(e).strip().splitlines()[0][:200]})"
        if isinstance(e, MemoryError) or any(t in text for t in _OOM_TEXT):
            kind = "GPU" if "cuda" in text or type(e).__name__ == "OutOfMemoryError" else "host"
            return f"the {kind} memory ran out ({type(e).__name__})"
        if type(e).__name__ in _PEER_TYPES or any(t in text for t in _PEER_TEXT):
            return f"another process of the run stopped answering ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def _filename(e: OSError) -> str:
    return f": {e.filename}" if e.filename else ""


def environment_message(command: str, what: str) -> str:
    """The one paragraph printed for an environment failure: what happened, what is intact, what to do."""
    return (
        f"vlkit {command}: {what}. This is not a bug in vlkit or in your input. Files vlkit writes are written "
        "atomically (a temporary name, then a rename), so the last complete checkpoint and any earlier output are "
        "untouched and a half-written file is never taken for a complete one; free the resource (disk space, "
        "memory, the failed node) and run the same command again (a training run goes on from its last complete "
        "checkpoint with trainer.checkpoint.resume=latest). Set VLKIT_DEBUG=1 to see the traceback."
    )
