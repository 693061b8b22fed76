"""ImageFolder for classification: ``<root>/<split>/<class>/<image>`` with a ``classes.json`` class index.

Class index file (``classes.json``): a JSON object whose ``"classes"`` list holds the class names in index order
(index = position) and whose optional ``"folders"`` list holds each class's folder name when it differs from the
class name (``vlkit data shapes`` writes "red triangle" -> ``red_triangle``); other keys (``"templates"`` for
zero-shot prompts, for instance) are allowed and ignored here. A bare JSON list of names is read too. Lookup order:
the ``classes`` argument, ``<root>/<split>/classes.json``, ``<root>/classes.json``, else the sorted names of the
split's sub-directories. :meth:`ImageFolder.write_classes` writes ``<root>/classes.json`` so every split of the root
reads the same indices, even a split missing a class.

Bad images: a map-style dataset must return something for every index, so an image that fails to decode is
replaced by the next good index (wrapping around) and logged once, naming the file and the reason. The failure is
remembered in a shared-memory byte per sample, so DataLoader workers never decode a known-bad file again and
:attr:`ImageFolder.skipped` (counts per reason, including files excluded at scan time) is right in the main process
whichever worker met the file. The cost: the replacement sample appears twice in that epoch.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from vlkit.data.images import DEFAULT_MAX_PIXELS, REASONS, SAFE_FORMATS, ImageDecodeError, read_image, to_rgb
from vlkit.data.index_loader import IndexLoader, SeededSample

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".qoi",
)  # fmt: skip


def read_class_index(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The (class names, folder names) of a ``classes.json``, both in index order.

    Raises:
        ValueError: not one of the accepted shapes, lists of different lengths, or a folder name that is empty,
            duplicated or not a plain directory name.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a class index: {e}") from None
    names = data.get("classes") if isinstance(data, dict) else data
    folders = data.get("folders", names) if isinstance(data, dict) else data
    for field, values in (("classes", names), ("folders", folders)):
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}: {field!r} must be a list of strings ({{'classes': [names...]}} or a list)")
    if len(folders) != len(names):
        raise ValueError(f"{path}: {len(names)} classes but {len(folders)} folders")
    _check_folder_names(folders, str(path))
    return names, folders


def write_class_index(
    path: str | os.PathLike, classes: Sequence[str], folders: Sequence[str] | None = None, **extra: Any
) -> Path:
    """Write a ``classes.json`` atomically (temp file, then rename); ``extra`` keys are stored beside the lists."""
    content: dict[str, Any] = {"classes": list(classes)}
    if folders is not None and list(folders) != list(classes):
        if len(folders) != len(classes):
            raise ValueError(f"{len(classes)} classes but {len(folders)} folders")
        content["folders"] = list(folders)
    _check_folder_names(content.get("folders", content["classes"]), str(path))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**content, **extra}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_folder_names(names: list[str], where: str) -> None:
    # Folder names are joined to the split directory: one that climbs out ("..") or into a sub-path must not be.
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"{where}: folder name {name!r} is not a plain directory name")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"{where}: duplicate folder names {dupes}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class ImageFolder(Dataset):
    """Images in ``<root>/<split>/<class>/...`` (any depth below the class folder) with their class index.

    Files are found by extension (:data:`IMAGE_EXTENSIONS`, any case; hidden files skipped). A symlink is followed
    only when its target lies inside ``root``; anything resolving outside is excluded at scan time and counted as
    ``outside_root``.

    Args:
        root: the dataset folder.
        split: a sub-folder of ``root`` (``"train"``, ``"val"``); None: the class folders are directly in ``root``.
        transform: applied to the decoded PIL image (e.g. ``get_transform(model, train=True)``); None returns the
            RGB image as a uint8 tensor ``[3, H, W]``.
        classes: class names in index order (also the folder names), or the path of a ``classes.json``; None:
            looked up as the module docstring says.
        extensions: the file suffixes taken as images.
        max_pixels: images with more pixels are skipped as ``too_large``.
        formats: Pillow formats that may be decoded.

    Attributes:
        classes: class names in index order. folders: their folder names (the same unless the index says).
        class_to_idx: class name -> index.
        samples: (path, class index) pairs. targets: the class indices alone.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        *,
        classes: Sequence[str] | str | os.PathLike | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        formats: Sequence[str] = SAFE_FORMATS,
    ):
        self.root = Path(root).resolve()
        self.split = split
        self.directory = self.root / split if split else self.root
        if split and not _inside(self.directory.resolve(), self.root):
            raise ValueError(f"split {split!r} resolves outside {self.root}")
        if not self.directory.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.directory}")
        self.transform = transform
        self.extensions = tuple(e.lower() for e in extensions)
        self.max_pixels = max_pixels
        self.formats = tuple(formats)
        self.classes, self.folders = self._resolve_classes(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self._excluded: Counter[str] = Counter()
        self.samples = self._scan()
        self.targets = [target for _, target in self.samples]
        # 0 = not known bad, 1 + REASONS.index(reason) = skipped for that reason; shared so workers see each other.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def _resolve_classes(self, classes: Sequence[str] | str | os.PathLike | None) -> tuple[list[str], list[str]]:
        if isinstance(classes, (str, os.PathLike)):
            return read_class_index(classes)
        if classes is not None:
            names = list(classes)
            _check_folder_names(names, "classes argument")
            return names, names
        for candidate in (self.directory / CLASSES_FILE, self.root / CLASSES_FILE):
            if candidate.is_file():
                return read_class_index(candidate)
        names = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"{self.directory}: no class folders and no {CLASSES_FILE}")
        return names, names

    def _scan(self) -> list[tuple[str, int]]:
        known = set(self.folders)
        unknown = sorted(
            p.name
            for p in self.directory.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in known
        )
        if unknown:
            # A folder the class index does not know would silently shift or drop labels; make the mismatch loud.
            raise ValueError(f"{self.directory}: folders {unknown} are not in the class index ({len(known)} folders)")
        samples = []
        for index, folder in enumerate(self.folders):
            class_dir = self.directory / folder
            if class_dir.is_dir():
                samples += [(path, index) for path in self._images_under(class_dir)]
        return samples

    def _images_under(self, class_dir: Path) -> list[str]:
        found: list[str] = []
        seen: set[Path] = set()
        stack = [class_dir]
        while stack:
            directory = stack.pop()
            real = directory.resolve()
            if not _inside(real, self.root):
                self._excluded["outside_root"] += 1
                continue
            if real in seen:  # a symlinked directory looping back: walk each real directory once
                continue
            seen.add(real)
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    subdirs.append(Path(entry.path))
                # is_file() also keeps FIFOs and devices named *.jpg out: reading one would block or never end.
                elif entry.is_file() and entry.name.lower().endswith(self.extensions):
                    # Only a symlink can lead outside a directory already known to lie inside the root.
                    if entry.is_symlink() and not _inside(Path(entry.path).resolve(), self.root):
                        self._excluded["outside_root"] += 1
                    else:
                        found.append(entry.path)
            stack.extend(reversed(subdirs))
        return found

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Any:
        path = self.samples[index][0]
        img = to_rgb(read_image(path, max_pixels=self.max_pixels, formats=self.formats), key=path)
        return self.transform(img) if self.transform is not None else F.pil_to_tensor(img)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """(transformed image, class index); a bad image is replaced by the next good one (see the module doc)."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            try:
                return self._load(i), self.samples[i][1]
            except ImageDecodeError as e:
                self._bad[i] = 1 + REASONS.index(e.reason)
                log.warning("ImageFolder skipped %s: %s (%s)", self.samples[i][0], e.reason, e.detail)
        raise RuntimeError(f"{self.directory}: none of the {n} images could be decoded ({self.skipped})")

    @property
    def skipped(self) -> dict[str, int]:
        """Counts of skipped files per reason: decode failures met so far plus ``outside_root`` exclusions."""
        counts = Counter(self._excluded)
        codes = torch.bincount(self._bad.long(), minlength=1 + len(REASONS)).tolist()
        for reason, count in zip(REASONS, codes[1:]):
            if count:
                counts[reason] += count
        return dict(counts)

    def write_classes(self, path: str | os.PathLike | None = None, **extra: Any) -> Path:
        """Write this dataset's class index, by default to ``<root>/classes.json`` (shared by every split)."""
        target = path if path is not None else self.root / CLASSES_FILE
        return write_class_index(target, self.classes, self.folders, **extra)


class ImageFolderLoader(IndexLoader):
    """Training batches from an :class:`ImageFolder`: the :class:`~vlkit.data.index_loader.IndexLoader` (whole
    batches dealt to ranks, full rounds only, an exact resumable position) with each sample's random augmentation
    seeded by ``sample_seed(seed, epoch, "imagefolder", index)``.

    Batches: ``image`` [B, 3, H, W], ``label`` [B] (long), ``key`` (paths relative to the dataset root),
    ``mix_seed`` ((seed, epoch, the batch's number in the epoch), for batch-level random draws such as mixup: the same
    for a batch whatever the data-parallel layout).
    """

    def __init__(
        self,
        dataset: ImageFolder,
        batch_size: int,
        *,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_size,
            sample=SeededSample(dataset, seed, "imagefolder"),
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            drop_last=True,
            name=str(dataset.directory),
        )

    def finish(self, batch: Any, indices: list[int], number: int) -> dict[str, Any]:
        images, labels = batch
        keys = [os.path.relpath(self.dataset.samples[i][0], self.dataset.root) for i in indices]
        return {"image": images, "label": labels, "key": keys, "mix_seed": (self.seed, self.epoch, number)}
