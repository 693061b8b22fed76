"""What the evaluators share: results, devices and precision, eval data, sharding across ranks, top-k counting.

Sharded evaluation: with ``torch.distributed`` initialised, each rank of ``group`` reads every ``world_size``-th
sample (ImageFolder) or its readers' part of the shards, and counts are combined with ``all_reduce``; retrieval
features are gathered. Ranks step through their batches in lockstep (a rank out of data runs a throwaway forward on
a dummy input) because a model sharded with FSDP or tensor parallelism needs every rank in every forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkit.utils.errors import UserError
from vlkit.utils.modules import is_sharded, model_device, unwrap

CLASSES_FILE = "classes.json"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many classes the confusion matrix (C x C counts) is not kept: 21k classes would need 3.5 GB.
MAX_CONFUSION_CLASSES = 4096


class EvalUsageError(UserError, ValueError):
    """Bad input the user can fix (a missing path, the wrong kind of model, unlabelled data); the CLI exits 2."""


# ---------------------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """One evaluation's outcome.

    Attributes:
        task: ``zeroshot_classification``, ``zeroshot_retrieval`` or ``classification``.
        metrics: metric name -> value (CLIP_benchmark's names, see docs/evaluation.md).
        dataset: the data as named in reports (the path given, unless a name was passed).
        model: the model's name (the model directory's name, unless given).
        pretrained: where the weights came from (the model path).
        num_samples: images evaluated (over all ranks).
        info: JSON-able facts about the run (templates, classes source, skipped samples, ...).
        details: tensors and lists for further analysis (confusion matrix, per-sample predictions, ranks, ...);
            not part of the JSON.
    """

    task: str
    metrics: dict[str, float]
    dataset: str = ""
    model: str = ""
    pretrained: str = ""
    num_samples: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """CLIP_benchmark's result object (``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``,
        ``language``), with vlkit's extras under ``"vlkit"``."""
        from vlkit import __version__

        return {
            "dataset": self.dataset,
            "model": self.model,
            "pretrained": self.pretrained,
            "task": self.task,
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "language": "en",
            "vlkit": {"version": __version__, "num_samples": self.num_samples, **self.info},
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


# ------------------------------------------------------------------------------------------- devices and precision


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: the current CUDA device when there is one, else the CPU.

    Raises:
        EvalUsageError: an unknown device, or CUDA asked for where there is none.
    """
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise EvalUsageError(f"device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalUsageError(f"device {device}: CUDA is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision``: ``auto`` is bf16 on CUDA and fp32 (no autocast) elsewhere."""
    if precision not in PRECISIONS:
        raise EvalUsageError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def register_forward_methods(model: nn.Module, names: Sequence[str]) -> None:
    """Make FSDP2 gather the root's parameters for ``model.<name>()`` as it does for ``forward`` (once per model)."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:  # pragma: no cover - old torch
        return
    if not isinstance(model, FSDPModule):
        return
    done = getattr(model, "_vlkit_fsdp_methods", set())
    for name in names:
        if name not in done and hasattr(model, name):
            register_fsdp_forward_method(model, name)
            done.add(name)
    model._vlkit_fsdp_methods = done


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` under ``torch.no_grad()``; every submodule's own train/eval flag is put back afterwards
    (a trainer may keep frozen towers in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def require_methods(model: nn.Module, names: Sequence[str], command: str, hint: str) -> None:
    missing = [n for n in names if not callable(getattr(model, n, None))]
    if missing:
        kind = type(model).__name__
        raise EvalUsageError(f"{command} needs a model with {', '.join(names)}; a {kind} has none. {hint}")


def image_size(model: nn.Module) -> tuple[int, int]:
    vision = model.config.vision
    return int(vision.img_h), int(vision.img_w)


def logit_scale(model: nn.Module, default: float = 100.0) -> float:
    """The model's (clamped) temperature, to turn cosine similarities into probabilities."""
    scale = getattr(model, "scale", None)
    if callable(scale):
        with contextlib.suppress(Exception):
            value = scale()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            return float(value)
    return default


# ----------------------------------------------------------------------------------------------- ranks and sharding


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded evaluation (rank 0 of 1 when not sharded)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_shard(distributed: bool | None = None, group: Any = None) -> Shard:
    """Shard over ``group`` (default: the world) when torch.distributed is initialised, unless ``distributed=False``.

    Raises:
        EvalUsageError: ``distributed=True`` without an initialised process group.
    """
    if distributed is False:
        return Shard()
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise EvalUsageError("distributed evaluation needs an initialised torch.distributed process group")
        return Shard()
    return Shard(dist.get_rank(group), dist.get_world_size(group), group)


def comm_device(shard: Shard) -> torch.device:
    if dist.get_backend(shard.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``shard`` (the tensor itself when not sharded)."""
    if not shard.distributed:
        return tensor
    t = tensor.to(comm_device(shard)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=shard.group)
    return t.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; the ranks may hold different row counts."""
    if not shard.distributed:
        return tensor
    dev = comm_device(shard)
    counts = all_gather_counts(tensor.shape[0], shard)
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]), device=dev)
    padded[: tensor.shape[0]] = tensor.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.device)


def all_gather_counts(n: int, shard: Shard) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not shard.distributed:
        return [n]
    dev = comm_device(shard)
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(shard.world_size)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=dev), group=shard.group)
    return [int(c) for c in counts]


def all_gather_objects(obj: Any, shard: Shard) -> list[Any]:
    if not shard.distributed:
        return [obj]
    out: list[Any] = [None] * shard.world_size
    dist.all_gather_object(out, obj, group=shard.group)
    return out


def lockstep(batches: Iterable[dict], shard: Shard) -> Iterator[dict | None]:
    """The batches, then ``None`` until every rank has run out, so all ranks take the same number of steps.

    A ``None`` asks the caller for a throwaway forward on a dummy input: a sharded model (FSDP, tensor parallel)
    hangs unless every rank joins every forward.
    """
    if not shard.distributed:
        yield from batches
        return
    dev = comm_device(shard)
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], device=dev)
        dist.all_reduce(more, op=dist.ReduceOp.MAX, group=shard.group)
        if not int(more):
            return
        yield batch


# --------------------------------------------------------------------------------------------------------- eval data


@dataclass
class EvalData:
    """Batches to evaluate, as dicts: ``image`` [B, 3, H, W], ``label`` [B] (classification), ``captions``
    list[list[str]] (retrieval), ``key`` list[str].

    Attributes:
        name: the data as named in reports.
        kind: ``imagefolder``, ``shards`` or ``batches`` (an iterable given in Python).
        num_samples: this rank's samples when known (for the progress bar).
        classes: class names the data carries (an ImageFolder's, or a ``classes.json`` found next to the shards).
        classes_file: that ``classes.json``, if any.
        skipped: a callable returning counts of skipped samples per reason.
    """

    batches: Iterable[dict]
    name: str
    kind: str
    num_samples: int | None = None
    classes: list[str] | None = None
    classes_file: Path | None = None
    skipped: Callable[[], dict[str, int]] = dict


def find_classes_file(*folders: Path | None) -> Path | None:
    """The first ``classes.json`` in ``folders`` or their parents (a split folder's dataset root holds it)."""
    for folder in folders:
        if folder is None:
            continue
        for candidate in (folder / CLASSES_FILE, folder.parent / CLASSES_FILE):
            if candidate.is_file():
                return candidate
    return None


def is_shard_spec(text: str) -> bool:
    """Shard specs that are not a single local path: URLs, ``::`` lists, brace ranges, globs."""
    return text.startswith("pipe:") or "://" in text or "::" in text or any(c in text for c in "{*?[")


def resolve_data_location(data: str | os.PathLike, split: str | None = None) -> tuple[str, str, Path | None]:
    """(source spec, ``"shards"`` or ``"imagefolder"``, local folder or None) for a ``--data`` argument.

    A directory holding ``.tar`` files is a shard directory; otherwise an ImageFolder. ``split`` selects a sub-folder;
    without it, a directory with no shards but a ``val/`` sub-folder (what ``vlkit data shapes`` writes) means
    ``val/``. Give ``split="."`` to use the directory itself.

    Raises:
        EvalUsageError: the path does not exist, or is a file that is not a ``.tar`` shard.
    """
    text = os.fspath(data)
    if is_shard_spec(text):
        from vlkit.data.sources import expand_urls, is_remote

        try:
            urls = expand_urls(text.split("::")[0])
        except ValueError as e:
            raise EvalUsageError(f"--data {text}: {e}") from None
        folder = None if is_remote(urls[0]) else Path(urls[0]).parent
        return text, "shards", folder
    path = Path(text).expanduser()
    if not path.exists():
        raise EvalUsageError(f"--data {text}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise EvalUsageError(f"--data {text}: not a .tar shard, a shard spec or a directory")
        return str(path), "shards", path.parent
    if split not in (None, "", "."):
        path = path / split
        if not path.is_dir():
            raise EvalUsageError(f"--data {text} --split {split}: {path} is not a directory")
    elif split is None and not any(path.glob("*.tar")) and (path / "val").is_dir():
        path = path / "val"
    if any(path.glob("*.tar")):
        return str(path), "shards", path
    return str(path), "imagefolder", path


def open_eval_data(
    data: str | os.PathLike | Iterable,
    *,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    shard: Shard,
    labels: bool = False,
    captions: bool = False,
    caption_key: str = "txt",
    split: str | None = None,
    num_workers: int = 2,
    max_samples: int | None = None,
) -> EvalData:
    """Open ``data`` for one evaluation pass on this rank.

    Args:
        data: a path or shard spec (see :func:`resolve_data_location`), or an iterable of batches (dicts with
            ``image`` and ``label`` / ``captions`` (or ``caption``), or ``(images, labels)`` pairs), used as is: the
            caller shards it.
        transform: PIL image -> tensor (the model's eval transform).
        batch_size: images per batch.
        shard: this rank's place; rank ``r`` of ``n`` reads its ``1/n`` of the samples.
        labels: the evaluation needs class labels (ImageFolder folders, or shards' ``cls`` member).
        captions: the evaluation needs captions (shards' ``caption_key`` member, see :func:`split_captions`).
        caption_key: the shard member holding the captions.
        split: see :func:`resolve_data_location`.
        num_workers: DataLoader workers.
        max_samples: evaluate at most this many samples in all (each rank its ``ceil(max_samples / n)``).
    """
    if not isinstance(data, (str, os.PathLike)):
        return EvalData(batches=_normalise_batches(data), name="batches", kind="batches")
    if batch_size < 1:
        raise EvalUsageError(f"batch size must be >= 1, got {batch_size}")
    spec, kind, folder = resolve_data_location(data, split)
    classes_file = find_classes_file(folder)
    if kind == "imagefolder":
        if captions:
            raise EvalUsageError(f"--data {data}: retrieval needs webdataset shards with captions, not an ImageFolder")
        return _imagefolder_data(spec, classes_file, transform, batch_size, shard, num_workers, max_samples, data)
    return _shard_data(
        spec, classes_file, transform, batch_size, shard, labels, captions, caption_key, num_workers, max_samples, data
    )


def _imagefolder_data(spec, classes_file, transform, batch_size, shard, num_workers, max_samples, name) -> EvalData:
    from torch.utils.data import DataLoader, Subset

    from vlkit.data.imagefolder import ImageFolder

    try:
        dataset = ImageFolder(spec, transform=transform, classes=classes_file)
    except (FileNotFoundError, ValueError) as e:
        raise EvalUsageError(f"--data {name}: {e}") from None
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = list(range(shard.rank, total, shard.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    root = Path(spec)

    def batches() -> Iterator[dict]:
        start = 0
        for images, targets in loader:
            n = len(targets)
            keys = [os.path.relpath(dataset.samples[i][0], root) for i in indices[start : start + n]]
            start += n
            yield {"image": images, "label": targets, "key": keys}

    return EvalData(
        batches=batches(),
        name=os.fspath(name),
        kind="imagefolder",
        num_samples=len(indices),
        classes=list(dataset.classes),
        classes_file=classes_file,
        skipped=lambda: dataset.skipped,
    )


def _shard_data(
    spec, classes_file, transform, batch_size, shard, labels, captions, caption_key, num_workers, max_samples, name
) -> EvalData:
    from vlkit.data.imagefolder import read_class_index
    from vlkit.data.shards import ShardDataset, ShardLoader

    try:
        dataset = ShardDataset(
            spec,
            batch_size=batch_size,
            image_transform=transform,
            tokenizer=None,
            text_key=caption_key if captions else None,
            label_key="cls" if labels else None,
            shuffle=False,
            rank=shard.rank,
            world_size=shard.world_size,
        )
    except ValueError as e:
        raise EvalUsageError(f"--data {name}: {e}") from None
    # Fewer shards than readers is fine for evaluation (readers then split shards sample by sample).
    workers = min(num_workers, max(1, len(dataset.shard_list()) // shard.world_size))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only .* shard")
        loader = ShardLoader(dataset, num_workers=workers, equal_batches=False)
    per_rank = None if max_samples is None else math.ceil(max_samples / shard.world_size)
    known = dataset.num_samples
    if known is not None:
        known = len(range(shard.rank, known, shard.world_size))
    if per_rank is not None:
        known = per_rank if known is None else min(known, per_rank)

    def batches() -> Iterator[dict]:
        seen = 0
        for batch in loader:
            if per_rank is not None and seen + len(batch["key"]) > per_rank:
                batch = {k: v[: per_rank - seen] for k, v in batch.items()}
            seen += len(batch["key"])
            if captions:
                batch["captions"] = [split_captions(c, caption_key) for c in batch.pop("caption")]
            if batch["key"]:
                yield batch
            if per_rank is not None and seen >= per_rank:
                return

    try:
        classes = read_class_index(classes_file)[0] if classes_file is not None else None
    except ValueError as e:
        raise EvalUsageError(str(e)) from None
    return EvalData(
        batches=batches(),
        name=os.fspath(name),
        kind="shards",
        num_samples=known,
        classes=classes,
        classes_file=classes_file,
        skipped=lambda: dict(loader.metrics["skipped"]),
    )


def split_captions(raw: str, caption_key: str = "txt") -> list[str]:
    """The captions of one sample.

    A ``json`` member holds a list of strings, or an object with a ``"captions"`` list or a ``"caption"`` string;
    any other member (``txt``) holds one caption per non-empty line.
    """
    if caption_key.split(".")[-1] == "json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return []
        if isinstance(data, dict):
            data = data.get("captions", data.get("caption"))
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            return []
        return [c.strip() for c in data if isinstance(c, str) and c.strip()]
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _normalise_batches(batches: Iterable) -> Iterator[dict]:
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = {"image": batch[0], "label": batch[1]}
        batch = dict(batch)
        if "captions" not in batch and "caption" in batch:
            batch["captions"] = [[c] if isinstance(c, str) else list(c) for c in batch.pop("caption")]
        batch.setdefault("key", [""] * len(batch["image"]))
        yield batch


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- top-k classification


class TopKCounter:
    """Counts for top-k accuracy, per-class recall and the confusion matrix, summed over batches and ranks.

    Args:
        num_classes: C.
        topk: the k of the ``acc{k}`` metrics; each is capped at C (with 3 classes, ``acc5`` is top-3).
        confusion: keep the C x C confusion matrix (rows: true class, columns: top-1 prediction); None: when
            C <= :data:`MAX_CONFUSION_CLASSES`.
        keep_predictions: keep each sample's top ``keep_predictions`` classes and probabilities (0: none).
    """

    def __init__(
        self,
        num_classes: int,
        topk: Sequence[int] = (1, 5),
        confusion: bool | None = None,
        keep_predictions: int = 0,
    ) -> None:
        if num_classes < 1:
            raise ValueError("need at least one class")
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.long)
        self.support = torch.zeros(num_classes, dtype=torch.long)
        self.hits = torch.zeros(num_classes, dtype=torch.long)
        keep = num_classes <= MAX_CONFUSION_CLASSES if confusion is None else confusion
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long) if keep else None
        self.keep_predictions = min(keep_predictions, num_classes)
        self.bad_labels = 0
        self.bad_example: int | None = None
        self.predictions: dict[str, list] = {"key": [], "label": [], "topk_indices": [], "topk_probs": []}

    @property
    def count(self) -> int:
        return int(self.support.sum())

    def update(self, scores: torch.Tensor, labels: torch.Tensor, keys: Sequence[str] | None = None) -> None:
        """Add a batch: ``scores`` [B, C] (logits or similarities; higher is better), ``labels`` [B].

        Labels outside ``[0, C)`` are left out and counted (:meth:`metrics` then raises).
        """
        scores, labels = scores.detach().float().cpu(), labels.detach().long().cpu()
        c = self.num_classes
        if scores.shape[1] != c:
            raise ValueError(f"scores have {scores.shape[1]} columns for {c} classes")
        # An out-of-range label is counted, not raised here: under sharded evaluation a rank that raised alone
        # would leave the others waiting in a collective. metrics() raises once the counts are combined.
        bad = (labels < 0) | (labels >= c)
        if bad.any():
            self.bad_labels += int(bad.sum())
            if self.bad_example is None:
                self.bad_example = int(labels[bad][0])
            scores, labels = scores[~bad], labels[~bad]
            keys = [k for k, b in zip(keys, bad.tolist()) if not b] if keys is not None else None
        k = min(max(self.topk), c)
        top = scores.topk(k, dim=1).indices
        match = top == labels[:, None]
        for i, kk in enumerate(self.topk):
            self.correct[i] += int(match[:, : min(kk, c)].any(dim=1).sum())
        self.support += torch.bincount(labels, minlength=c)
        self.hits += torch.bincount(labels[match[:, 0]], minlength=c)
        if self.confusion is not None:
            self.confusion += torch.bincount(labels * c + top[:, 0], minlength=c * c).view(c, c)
        if self.keep_predictions:
            probs = scores.softmax(dim=1).topk(self.keep_predictions, dim=1)
            self.predictions["key"] += list(keys) if keys is not None else [""] * len(labels)
            self.predictions["label"].append(labels)
            self.predictions["topk_indices"].append(probs.indices)
            self.predictions["topk_probs"].append(probs.values)

    def reduce(self, shard: Shard) -> None:
        """Sum the counts (and gather the predictions, in rank order) over the ranks of ``shard``."""
        if not shard.distributed:
            return
        self.correct = all_reduce_sum(self.correct, shard)
        self.support = all_reduce_sum(self.support, shard)
        self.hits = all_reduce_sum(self.hits, shard)
        self.bad_labels = int(all_reduce_sum(torch.tensor([self.bad_labels]), shard))
        if self.confusion is not None:
            self.confusion = all_reduce_sum(self.confusion, shard)
        if self.keep_predictions:
            local = self.prediction_tensors()
            parts = all_gather_objects(local, shard)
            self.predictions = {
                "key": [k for p in parts for k in p["key"]],
                "label": [p["label"] for p in parts],
                "topk_indices": [p["topk_indices"] for p in parts],
                "topk_probs": [p["topk_probs"] for p in parts],
            }

    def metrics(self) -> dict[str, float]:
        """``acc{k}`` for each k, and ``mean_per_class_recall`` (the mean over classes that have samples).

        Raises:
            EvalUsageError: no samples, or labels outside ``[0, C)`` (class list and data do not match).
        """
        if self.bad_labels:
            example = f" (e.g. {self.bad_example})" if self.bad_example is not None else ""
            raise EvalUsageError(
                f"{self.bad_labels} label(s) outside the {self.num_classes} classes{example}: "
                "the class list does not match the data"
            )
        n = self.count
        if n == 0:
            raise EvalUsageError("no samples were evaluated")
        out = {f"acc{k}": float(self.correct[i]) / n for i, k in enumerate(self.topk)}
        present = self.support > 0
        out["mean_per_class_recall"] = float((self.hits[present].double() / self.support[present]).mean())
        return out

    def prediction_tensors(self) -> dict[str, Any]:
        """Per-sample ``key`` list, ``label`` [N], ``topk_indices`` [N, k], ``topk_probs`` [N, k]."""
        p, k = self.predictions, self.keep_predictions

        def cat(parts: list, empty: torch.Tensor) -> torch.Tensor:
            return torch.cat(parts) if parts else empty

        return {
            "key": list(p["key"]),
            "label": cat(p["label"], torch.zeros(0, dtype=torch.long)),
            "topk_indices": cat(p["topk_indices"], torch.zeros(0, k, dtype=torch.long)),
            "topk_probs": cat(p["topk_probs"], torch.zeros(0, k)),
        }


def classification_pass(
    model: nn.Module,
    data: EvalData,
    forward: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    counter: TopKCounter,
    *,
    shard: Shard,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    desc: str,
    keep_images: int = 0,
) -> list[torch.Tensor]:
    """Score ``data`` into ``counter``: ``forward`` (images on ``device`` -> features, under autocast), then ``head``
    (features -> [B, C] scores, in fp32). Returns this rank's first ``keep_images`` input images."""
    kept: list[torch.Tensor] = []
    n_kept = 0
    with progress_bar(progress, data.num_samples, desc) as bar:
        for batch in lockstep(data.batches, shard):
            if batch is None:
                with autocast(device, dtype):
                    forward(torch.zeros(1, 3, *image_size(model), device=device))
                continue
            if "label" not in batch:
                raise EvalUsageError(f"--data {data.name}: batches carry no class labels")
            images = batch["image"]
            with autocast(device, dtype):
                features = forward(images.to(device, non_blocking=True))
            counter.update(head(features.float()), batch["label"], batch.get("key"))
            if n_kept < keep_images:
                kept.append(images[: keep_images - n_kept].cpu())
                n_kept += len(kept[-1])
            bar.update(len(images))
    return kept


def skipped_counts(data: EvalData, shard: Shard) -> dict[str, int]:
    """Skipped samples per reason, summed over the ranks."""
    total: dict[str, int] = {}
    for part in all_gather_objects(dict(data.skipped()), shard):
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + int(n)
    return total


def no_samples_error(data: EvalData, skipped: dict[str, int], needs: str) -> EvalUsageError:
    detail = f" (skipped: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))})" if skipped else ""
    return EvalUsageError(f"--data {data.name}: no usable samples{detail}; {needs}")


def model_names(model_path: str | os.PathLike | None, model_name: str | None) -> tuple[str, str]:
    """(model, pretrained) for reports: the given name, else the model directory's name; and the path."""
    path = os.fspath(model_path) if model_path is not None else ""
    name = model_name or (Path(path).name if path else "")
    return name, path


def refuse_lone_shard(inner: nn.Module, shard: Any) -> None:
    """A model sharded over ranks (FSDP / tensor parallel) can only be evaluated by all its ranks together."""
    if is_sharded(inner) and not shard.distributed and torch.distributed.is_initialized():
        raise EvalUsageError("the model is sharded across ranks (FSDP / tensor parallel): evaluate on every rank")


@dataclass
class ClipEvalSetup:
    inner: nn.Module
    shard: Any
    device: torch.device
    dtype: Any
    progress: bool
    transform: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


def prepare_clip_eval(
    model: nn.Module, purpose: str, hint: str, *, distributed, group, precision, progress, transform, tokenizer
) -> ClipEvalSetup:
    """What zero-shot and retrieval evaluation share: the unwrapped model, the shard, device and autocast dtype,
    and the model's own eval transform and tokenizer unless the caller gives them."""
    inner = unwrap(model)
    require_methods(inner, ("encode_image", "encode_text"), purpose, hint)
    shard = resolve_shard(distributed, group)
    refuse_lone_shard(inner, shard)
    register_forward_methods(inner, ("encode_image", "encode_text"))
    device = model_device(inner)
    if transform is None:
        from vlkit.data.transforms import get_transform

        transform = get_transform(inner, train=False)
    if tokenizer is None:
        from vlkit.data.tokenizer import get_tokenizer

        text_cfg = inner.config.text
        tokenizer = get_tokenizer(text_cfg.tokenizer, text_cfg.encoder_seq_length)
    return ClipEvalSetup(inner, shard, device, autocast_dtype(precision, device), progress and shard.rank == 0,
                         transform, tokenizer)  # fmt: skip
