"""Property tests of the tar reader: a truncated shard or a damaged header never raises out of the reader (the damage
becomes one ShardError, counted by the loader), and every sample that lies wholly before the damage comes out intact."""

import io
import os
import tarfile
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlkit.data.shards import build_shard_loader, iter_tar
from vlkit.data.stream import ShardError

BLOCK = 512
N_SAMPLES = 6


def _shard() -> tuple[bytes, list[dict], list[int]]:
    """A shard of N_SAMPLES samples (.txt + .cls, sizes that cross block boundaries), the samples' fields, and the
    byte offset at which each sample's last member (its data padded to a block) ends."""
    buf, samples, ends = io.BytesIO(), [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(N_SAMPLES):
            fields = {"txt": f"caption {i} ".encode() * (i * 37 % 90 + 1), "cls": str(i % 3).encode()}
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            samples.append(fields)
            ends.append(buf.tell())  # tarfile writes the padded data block at once
    return buf.getvalue(), samples, ends


SHARD, SAMPLES, ENDS = _shard()
# Header blocks: where each member's 512-byte header starts (the blocks a corrupted byte can hit to break parsing).
HEADERS = [off for off in range(0, ENDS[-1], BLOCK) if SHARD[off + 257 : off + 262] == b"ustar"]


def _read(data: bytes) -> tuple[list, list[ShardError]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "000000.tar")
        with open(path, "wb") as f:
            f.write(data)
        records, errors = [], []
        try:
            records.extend(iter_tar(path))
        except ShardError as e:  # the shard's end: what came before it is kept; any other exception fails the test
            errors.append(e)
        return records, errors


def _assert_good_prefix(records: list, damage_at: int) -> None:
    intact = [i for i, end in enumerate(ENDS) if end <= damage_at]
    got = {r.key: r.fields for r in records}
    for i in intact:
        assert got.get(f"{i:06d}") == SAMPLES[i], f"sample {i} (ends at {ENDS[i]}) lost before damage at {damage_at}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=len(SHARD) - 1))
def test_a_truncated_shard_keeps_every_sample_before_the_cut(cut):
    records, errors = _read(SHARD[:cut])
    _assert_good_prefix(records, cut)
    # A cut inside a header or a member is reported, once; one at a header boundary reads as a tar that ends there.
    if cut < ENDS[-1] and cut not in HEADERS:
        assert len(errors) == 1 and errors[0].reason in ("truncated", "unreadable")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.sampled_from(HEADERS),
    offset=st.integers(min_value=0, max_value=BLOCK - 1),
    flip=st.integers(min_value=1, max_value=255),
)
def test_a_corrupted_header_byte_never_escapes_and_keeps_the_samples_before_it(header, offset, flip):
    data = bytearray(SHARD)
    data[header + offset] ^= flip  # a changed byte, so the header's checksum no longer matches
    records, errors = _read(bytes(data))
    _assert_good_prefix(records, header)
    assert len(errors) <= 1


def test_the_loader_counts_a_truncated_shard_and_yields_the_samples_before_it(tmp_path):
    cut = ENDS[3] + 100  # inside sample 4's first header
    (tmp_path / "000000.tar").write_bytes(SHARD[:cut])
    (tmp_path / "000001.tar").write_bytes(b"\x00garbage" * 100)

    def tokenize(captions):
        return torch.tensor([[int(c.split()[1])] for c in captions])

    ld = build_shard_loader(
        str(tmp_path), image_transform=lambda img: torch.tensor([float(img)]), tokenizer=tokenize, num_workers=0,
        batch_size=1, image_key="cls", text_key="txt", shuffle=False, decode=lambda data, key: data,
    )  # fmt: skip
    keys = [k for batch in ld for k in batch["key"]]
    assert keys == [f"{i:06d}" for i in range(4)]
    errors = ld.metrics["shard_errors"]
    assert {os.path.basename(s): e["reason"] for s, e in errors.items()} == {
        "000000.tar": "truncated",
        "000001.tar": "unreadable",
    }
