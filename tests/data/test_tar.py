import io
import tarfile

import pytest

from vlkit.data.tar import Member, TarFormatError, TarReader


def make_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, mode: str = "w", extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def read_all(raw: bytes, read_every: int = 1) -> list[tuple[Member, bytes | None]]:
    """Members and their data; only every ``read_every``-th member's data is read, the others are skipped."""
    reader = TarReader(io.BytesIO(raw))
    return [(m, reader.read() if i % read_every == 0 else None) for i, m in enumerate(reader)]


MEMBERS = [("a/0001.jpg", b"\xff\xd8" + bytes(700)), ("a/0001.txt", b"a red circle"), ("a/0002.txt", b""),
           ("a/0002.json", b"{}" * 300)]  # fmt: skip


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_and_data_match_tarfile(fmt):
    raw = make_tar(MEMBERS, fmt)
    assert [(m.name, m.size, m.is_file, d) for m, d in read_all(raw)] == [(n, len(d), True, d) for n, d in MEMBERS]
    # Members whose data is not read are passed over, and the next ones still come out whole.
    assert [d for _, d in read_all(raw, read_every=2)] == [MEMBERS[0][1], None, MEMBERS[2][1], None]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_and_non_ascii_names(fmt):
    long_dir = "d" * 120 + "/" + "e" * 40  # > 100 characters: ustar's prefix field, GNU's L member or pax's path
    names = [f"{long_dir}/0001.jpg", "x/ünïcode.txt"] if fmt != tarfile.USTAR_FORMAT else [f"{long_dir}/0001.jpg"]
    raw = make_tar([(n, b"abc") for n in names], fmt)
    assert [m.name for m, _ in read_all(raw)] == names


def test_directories_and_links_are_not_files():
    d = tarfile.TarInfo("dir")
    d.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "a/0001.jpg"
    raw = make_tar(MEMBERS[:1], extra=(d, link))
    assert [(m.name, m.is_file) for m, _ in read_all(raw)] == [("a/0001.jpg", True), ("dir/", False),
                                                               ("link.jpg", False)]  # fmt: skip


def test_compressed_shards_go_through_tarfile():
    raw = make_tar(MEMBERS, mode="w:gz")
    assert [(m.name, d) for m, d in read_all(raw)] == MEMBERS


def test_broken_streams_raise():
    raw = make_tar(MEMBERS)
    with pytest.raises(TarFormatError, match="empty"):
        read_all(b"")
    cut = raw[: 512 + 300]  # inside the first member's data
    with pytest.raises(TarFormatError, match="unexpected end"):
        read_all(cut)
    with pytest.raises(TarFormatError, match="unexpected end"):
        read_all(cut, read_every=2)  # also when that member is skipped
    corrupt = bytearray(raw)
    corrupt[10] ^= 0xFF  # a byte of the first name: the header checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        read_all(bytes(corrupt))
    with pytest.raises(TarFormatError, match="checksum"):
        read_all(b"\xff\xd8\xff\xe0" + bytes(1020))  # a JPEG named .tar
    # Ending at a header boundary without the two zero blocks is accepted, as tarfile does.
    assert len(read_all(raw[: 512 + 1024 + 512 + 512])) == 2
