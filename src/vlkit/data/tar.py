"""Sequential reading of tar shards, member by member, without Python's per-member ``TarInfo`` machinery.

``tarfile``'s stream mode builds a ``TarInfo`` for every member (a dozen field conversions in Python): at CLIP's
small image sizes that was a quarter of the data loader's CPU time. Shards are plain, uncompressed tar files almost
always, so :class:`TarReader` parses their 512-byte headers itself: name (ustar prefix, GNU long names, pax
``path``), size (octal or base-256, pax ``size``), type and checksum. Compressed shards (gzip, bzip2, xz) go through
``tarfile`` unchanged.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO, NamedTuple

from vlkit.utils.errors import UserError

BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_SKIP_CHUNK = 1 << 20


class TarFormatError(UserError, ValueError):
    """The stream is not a (complete) tar file: a bad header checksum, or it ends inside a header or member."""


class Member(NamedTuple):
    name: str
    size: int
    is_file: bool


class _Prefixed:
    """A read-only stream that first replays ``head`` (bytes already read to sniff the format), then ``f``."""

    def __init__(self, head: bytes, f: IO[bytes]):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.f.read(n - len(out)) if len(out) < n else b"")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarReader:
    """Iterate the members of a tar stream in order; :meth:`read` returns the current member's data.

    A member whose data is not read is read past (not seeked over: a shard cut short must fail here, not look
    complete). A bad checksum, an empty stream or one that ends inside a header or member raises
    :class:`TarFormatError` (``tarfile``'s own errors for compressed shards).
    """

    def __init__(self, fileobj: IO[bytes]):
        self.f = fileobj
        self._remaining = 0  # data bytes of the current member not read yet
        self._padding = 0  # then the zeros up to the next 512-byte boundary
        self._tar: tarfile.TarFile | None = None
        self._tar_member: tarfile.TarInfo | None = None

    def __iter__(self) -> Iterator[Member]:
        head = self.f.read(BLOCK)  # a small compressed shard can be shorter than one block
        if not head:
            raise TarFormatError("empty file")
        if head.startswith(_COMPRESSED_MAGIC):
            yield from self._iter_tarfile(_Prefixed(head, self.f))
            return
        if len(head) < BLOCK:
            head += self._read_exact(BLOCK - len(head))
        long_name: str | None = None
        pax: dict[str, str] = {}
        while head and head != bytes(BLOCK):  # a zero block ends the archive; so does the end of the stream
            self._check_checksum(head)
            kind = head[156:157]
            self._start(_octal(head[124:136]))
            if kind in (b"L", b"x", b"g", b"K"):  # metadata about the next member
                data = self.read()
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(data)
            else:
                name = head[0:100].split(b"\0", 1)[0]
                if head[257:262] == b"ustar" and head[345] != 0:
                    name = head[345:500].split(b"\0", 1)[0] + b"/" + name
                if "size" in pax:
                    self._start(int(pax["size"]))
                text = long_name or pax.get("path") or name.decode("utf-8", "surrogateescape")
                long_name, pax = None, {}
                yield Member(text, self._remaining, kind in _REGULAR)
            self._discard(self._remaining + self._padding)
            self._remaining = self._padding = 0
            head = self._read_exact(BLOCK, allow_eof=True)

    def read(self) -> bytes:
        """The current member's data (once; empty after that)."""
        if self._tar is not None:
            extracted = self._tar.extractfile(self._tar_member) if self._tar_member is not None else None
            return extracted.read() if extracted is not None else b""
        data = self._read_exact(self._remaining)
        self._remaining = 0
        return data

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _start(self, size: int) -> None:
        self._remaining, self._padding = size, -size % BLOCK

    def _iter_tarfile(self, stream: _Prefixed) -> Iterator[Member]:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
            self._tar = tar
            for member in tar:
                self._tar_member = member
                yield Member(member.name, member.size, member.isreg())
                tar.members = []  # the streaming reader would otherwise keep every header

    def _read_exact(self, n: int, allow_eof: bool = False) -> bytes:
        data = self.f.read(n) if n else b""
        while 0 < len(data) < n:  # pipes and sockets may return less than asked
            more = self.f.read(n - len(data))
            if not more:
                break
            data += more
        if len(data) < n and not (allow_eof and not data):
            raise TarFormatError(f"unexpected end of data: {len(data)} of {n} bytes")
        return data

    def _discard(self, n: int) -> None:
        while n > 0:
            n -= len(self._read_exact(min(n, _SKIP_CHUNK)))

    @staticmethod
    def _check_checksum(head: bytes) -> None:
        stored = _octal(head[148:156])
        unsigned = sum(head) - sum(head[148:156]) + 8 * 32  # the checksum field counts as eight spaces
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in head if b > 127):
            raise TarFormatError("bad tar header checksum")
