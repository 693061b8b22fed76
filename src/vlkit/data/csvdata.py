"""CSV/TSV image-caption lists as a second source, with the same batches, position and skip metrics as shards.

The file needs a header. Image paths are relative to the file's directory (absolute paths are used as they are).
The delimiter follows the extension (``.tsv``/``.tab``: tab, ``.csv``: comma) and is sniffed otherwise. Text is read as
UTF-8; undecodable bytes become U+FFFD rather than costing the row.

Rows are cut into virtual shards of ``rows_per_part`` rows (``list.csv#0-999``), which the shard machinery shuffles,
deals to ranks and workers and resumes exactly like tar shards. A row that cannot be used (too few columns, empty
image path) is skipped as ``bad_row``; an image that does not exist is skipped as ``missing_file``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlkit.data.stream import Record, ShardLoader, StreamDataset
from vlkit.utils.errors import DataError

IMAGE_COLUMNS = ("filepath", "image", "image_path", "img", "path", "file", "filename")
CAPTION_COLUMNS = ("title", "caption", "text", "txt", "label_text")
_LABEL = "__label__"


def sniff_delimiter(path: str | os.PathLike) -> str:
    """Tab for ``.tsv``/``.tab``, comma for ``.csv``, else what :class:`csv.Sniffer` finds (comma if unsure)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        head = f.read(8192)
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def _pick(header: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, path: str) -> int:
    names = [h.strip() for h in header]
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{path}: no {what} column {wanted!r}; columns are {names}")
        return names.index(wanted)
    lowered = [n.lower() for n in names]
    for c in candidates:
        if c in lowered:
            return lowered.index(c)
    raise DataError(f"{path}: cannot tell the {what} column among {names}; name it (one of {list(candidates)})")


def read_rows(
    path: str | os.PathLike,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    label_col: str | None = None,
    delimiter: str | None = None,
) -> list[tuple[str | None, str | None, str | None, str]]:
    """Parse the file into ``(image path, caption, label, problem)`` rows; ``problem`` is "" for a usable row.

    Raises:
        ValueError: when the file has no header or the columns cannot be found.
    """
    path = os.fspath(path)
    delimiter = delimiter or sniff_delimiter(path)
    base = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str | None, str | None, str | None, str]] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file (a header row is needed)") from None
        i_img = _pick(header, image_col, IMAGE_COLUMNS, "image", path)
        i_cap = _pick(header, caption_col, CAPTION_COLUMNS, "caption", path)
        i_lab = _pick(header, label_col, (), "label", path) if label_col else None
        needed = max(i_img, i_cap, -1 if i_lab is None else i_lab)
        errors_in_a_row = 0
        while True:
            try:
                row = next(reader)
                errors_in_a_row = 0
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a NUL byte or a field over csv.field_size_limit: lose the row, not the file
                rows.append((None, None, None, f"unparsable row: {e}"))
                errors_in_a_row += 1
                if errors_in_a_row > 1000:
                    break
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= needed:
                rows.append((None, None, None, f"{len(row)} columns, expected at least {needed + 1}"))
                continue
            image = row[i_img].strip()
            if not image:
                rows.append((None, None, None, "empty image path"))
                continue
            caption = row[i_cap]
            label = row[i_lab] if i_lab is not None else None
            rows.append((os.path.join(base, image), caption, label, ""))
    return rows


class CsvDataset(StreamDataset):
    """Image-caption rows of a CSV/TSV file, batched like :class:`vlkit.data.shards.ShardDataset`.

    Args:
        path: the CSV/TSV file.
        batch_size, image_transform, tokenizer: as for ShardDataset.
        image_col, caption_col: column names; None picks the first known name (``filepath``/``image``/... and
            ``title``/``caption``/``text``/...).
        label_col: column of integer class labels (batches then carry ``label``).
        delimiter: None: from the extension, else sniffed.
        rows_per_part: rows per virtual shard (the unit of shuffling, worker split and resume).
        num_samples: samples per epoch; None: the number of rows.
        **kwargs: seed, shuffle, shuffle_buffer, resampled, drop_last, decode, rank, world_size.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        batch_size: int,
        image_transform: Any,
        tokenizer: Any,
        image_col: str | None = None,
        caption_col: str | None = None,
        label_col: str | None = None,
        delimiter: str | None = None,
        rows_per_part: int = 1000,
        num_samples: int | None = None,
        **kwargs: Any,
    ):
        kwargs.pop("label_key", None)
        self.path = os.fspath(path)
        self.rows = read_rows(
            self.path, image_col=image_col, caption_col=caption_col, label_col=label_col, delimiter=delimiter
        )
        if not self.rows:
            raise DataError(f"{self.path}: no data rows")
        step = max(1, rows_per_part)
        self.parts = [f"{self.path}#{i}-{min(i + step, len(self.rows)) - 1}" for i in range(0, len(self.rows), step)]
        super().__init__(
            batch_size=batch_size,
            image_transform=image_transform,
            tokenizer=tokenizer,
            text_key="txt",
            label_key=_LABEL if label_col else None,
            num_samples=len(self.rows) if num_samples is None else num_samples,
            **kwargs,
        )

    @property
    def bad_rows(self) -> int:
        """Rows that could not be parsed into an image path and caption."""
        return sum(1 for r in self.rows if r[3])

    def shard_list(self) -> list[str]:
        return self.parts

    def _read(self, url: str, skip: int) -> Iterator[Record]:
        first, last = (int(x) for x in url.rsplit("#", 1)[1].split("-"))
        for i in range(first + skip, last + 1):
            image, caption, label, problem = self.rows[i]
            fields: dict[str, Any] = {"__path__": image, "txt": caption, _LABEL: label}
            if problem:
                fields["__bad__"] = problem
            yield Record(i - first, f"{i:09d}", fields)

    def _skip_detail(self, record: Record) -> str:
        return str(record.fields.get("__bad__", ""))

    def _image_bytes(self, record: Record) -> tuple[bytes | None, str | None]:
        if "__bad__" in record.fields:
            return None, "bad_row"
        try:
            with open(record.fields["__path__"], "rb") as f:
                return f.read(), None
        except FileNotFoundError:
            return None, "missing_file"
        except OSError:
            return None, "unreadable_file"


def build_csv_loader(
    path: str | os.PathLike,
    *,
    batch_size: int,
    image_transform: Any,
    tokenizer: Any,
    num_workers: int = 2,
    **dataset_kwargs: Any,
):
    """A :class:`vlkit.data.stream.ShardLoader` over a CSV/TSV file (see :class:`CsvDataset` for the options)."""
    dataset = CsvDataset(
        path, batch_size=batch_size, image_transform=image_transform, tokenizer=tokenizer, **dataset_kwargs
    )
    return ShardLoader(dataset, num_workers=num_workers)
