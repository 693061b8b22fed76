"""Zero-shot classification: class embeddings from prompt templates, images scored by cosine similarity.

A class's embedding follows OpenAI's procedure: encode every prompt ("a photo of a {class}." for each template),
L2-normalise each prompt embedding, average over the templates, L2-normalise the average. Normalising before
averaging gives every template the same say; averaging raw embeddings would let templates with large-norm
embeddings dominate the class direction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.eval.data import no_samples_error, open_eval_data, progress_bar, resolve_data_location, skipped_counts
from vlkit.eval.distributed import Shard, all_reduce_sum
from vlkit.eval.results import EvalResult, EvalUsageError, model_names
from vlkit.eval.runtime import autocast, autocast_dtype, eval_mode, logit_scale, prepare_clip_eval
from vlkit.eval.templates import (
    classes_file_templates,
    fill_template,
    imagenet_classnames,
    resolve_classnames,
    resolve_templates,
)
from vlkit.eval.topk import TopKCounter, classification_pass
from vlkit.utils.modules import model_device, unwrap

TASK = "zeroshot_classification"


def average_prompt_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Class embeddings [C, D] from prompt embeddings [C, T, D]: normalise each, average over T, renormalise."""
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def build_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int = 256,
    precision: str = "auto",
    shard: Shard | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The zero-shot classifier: one unit-norm embedding per class, [C, D] float32 on the model's device.

    Equal to :func:`average_prompt_embeddings` of all C x T prompt embeddings, computed in batches of prompts
    (never holding C x T x D). With ``shard``, each rank encodes a slice of the prompts and the sums are all-reduced;
    every rank runs the same number of forwards.

    Args:
        model: a CLIP model (``encode_text``; DDP is looked through).
        classnames: C class names.
        templates: T templates with a ``{}`` (or ``{c}``) placeholder.
        tokenizer: list[str] -> LongTensor [B, L].
        batch_size: prompts per forward.
        precision: ``auto`` (bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16``.
        shard: split the prompts over the ranks of this shard.
        progress: show a progress bar.
    """
    if not classnames:
        raise EvalUsageError("no class names")
    if not templates:
        raise EvalUsageError("no templates")
    shard = shard or Shard()
    model = unwrap(model)
    device = model_device(model)
    dtype = autocast_dtype(precision, device)
    prompts = [(c, fill_template(t, name)) for c, name in enumerate(classnames) for t in templates]
    per_rank = math.ceil(len(prompts) / shard.world_size)
    mine = prompts[shard.rank * per_rank : (shard.rank + 1) * per_rank]
    sums = None
    steps = math.ceil(per_rank / batch_size)
    with progress_bar(progress, steps, "class embeddings", unit="batch") as bar:
        for step in range(steps):
            chunk = mine[step * batch_size : (step + 1) * batch_size]
            # A rank whose slice ran out still encodes a dummy prompt: a sharded model needs every rank's forward.
            ids = tokenizer([p for _, p in chunk] or [""]).to(device)
            with autocast(device, dtype):
                features = model.encode_text(ids)
            features = F.normalize(features.float(), dim=-1)
            if sums is None:
                sums = features.new_zeros(len(classnames), features.shape[-1])
            if chunk:
                index = torch.tensor([c for c, _ in chunk], device=device)
                sums.index_add_(0, index, features[: len(chunk)])
            bar.update(1)
    sums = all_reduce_sum(sums, shard)
    return F.normalize(sums / len(templates), dim=-1)


def _classnames_for(spec: Any, data_classes: list[str] | None, classes_file: Any, kind: str) -> tuple[list[str], str]:
    """Class names: given, else the dataset's ``classes.json``, else ImageNet's (or an ImageFolder's folder names
    when it does not have 1000 classes)."""
    if spec is not None:
        names, source = resolve_classnames(spec)
    elif classes_file is not None and data_classes:
        names, source = list(data_classes), os.fspath(classes_file)
    elif kind == "imagefolder" and data_classes and len(data_classes) != 1000:
        names, source = [c.replace("_", " ") for c in data_classes], "folder names"
    else:
        names, source = imagenet_classnames(), "imagenet"
    if kind == "imagefolder" and data_classes is not None and len(names) != len(data_classes):
        raise EvalUsageError(f"{len(names)} class names ({source}) for {len(data_classes)} class folders")
    return names, source


# CLIP_benchmark's webdataset folders carry their class names and prompts beside the shards (or one folder up, with the
# shards in test/): one name / one template per line.
CLIP_BENCHMARK_CLASSES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"


def clip_benchmark_files(data: Any, split: str | None = None) -> tuple[Path | None, Path | None]:
    """(``classnames.txt``, ``zeroshot_classification_templates.txt``) of a CLIP_benchmark dataset folder, each
    None when absent; used when neither the command line nor a ``classes.json`` names classes / templates."""
    if not isinstance(data, (str, os.PathLike)):
        return None, None
    try:
        _, _, folder = resolve_data_location(data, split)
    except EvalUsageError:
        return None, None
    if folder is None:
        return None, None
    found = (
        next((c for c in (folder / name, folder.parent / name) if c.is_file()), None)
        for name in (CLIP_BENCHMARK_CLASSES, CLIP_BENCHMARK_TEMPLATES)
    )
    return tuple(found)  # type: ignore[return-value]


def evaluate_zeroshot(
    model: nn.Module,
    data: str | os.PathLike | Iterable,
    *,
    classnames: str | os.PathLike | Sequence[str] | None = None,
    templates: str | os.PathLike | Sequence[str] | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    split: str | None = None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 2,
    precision: str = "auto",
    distributed: bool | None = None,
    group: Any = None,
    max_samples: int | None = None,
    topk: Sequence[int] = (1, 5),
    predictions_topk: int = 0,
    keep_images: int = 0,
    confusion: bool | None = None,
    progress: bool = True,
    dataset_name: str | None = None,
    model_name: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> EvalResult:
    """Zero-shot top-k accuracy and mean per-class recall of a CLIP model.

    Runs on the model's device, in eval mode without gradients (the model's train/eval flags are restored).

    Args:
        model: a CLIP model (also wrapped in DDP or FSDP2).
        data: an ImageFolder directory, webdataset shards with ``cls`` labels (a directory, ``.tar``, brace range,
            glob or URL), a dataset root with a ``val/`` split (``vlkit data shapes``), or an iterable of batches
            (dicts with ``image`` [B, 3, H, W] and ``label`` [B], or ``(images, labels)`` pairs).
        classnames: ``imagenet``, a file (``classes.json``, JSON list, one name per line) or a list; None: the
            dataset's ``classes.json`` if found (in the data folder or its parent), else ImageNet's 1000 names.
        templates: ``openai`` (80), ``openai7``, ``simple``, a file or a list; None: the ``templates`` of the
            dataset's ``classes.json`` if it has some, else ``openai``.
        tokenizer: list[str] -> ids; None: the model config's tokenizer and context length.
        transform: PIL -> tensor; None: ``get_transform(model, train=False)``.
        split: sub-folder of ``data`` (see :func:`vlkit.eval.data.resolve_data_location`).
        batch_size: images per forward. text_batch_size: prompts per forward.
        num_workers: data-loading workers.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        distributed: shard the data over the ranks of ``group`` (None: when torch.distributed is initialised;
            every rank must then call this). False: this process evaluates everything (e.g. rank 0 alone; not
            possible for an FSDP / tensor-parallel model).
        group: the process group to shard over (None: the world).
        max_samples: evaluate at most this many images (a quick check during training).
        topk: the k of the ``acc{k}`` metrics (capped at the number of classes).
        predictions_topk: keep each image's top classes and probabilities in ``details["predictions"]``.
        keep_images: keep the first N input images (transformed) in ``details["images"]``.
        confusion: keep the confusion matrix in ``details["confusion_matrix"]`` (None: up to 4096 classes).
        progress: show progress bars (on rank 0 only).
        dataset_name, model_name, model_path: names for the report.

    Returns:
        An :class:`EvalResult` with metrics ``acc1``, ``acc5``, ``mean_per_class_recall`` and details
        ``classes``, ``templates``, ``confusion_matrix`` [C, C] (rows: true class, columns: top-1 prediction),
        ``predictions`` ({``key``, ``label`` [N], ``topk_indices`` [N, k], ``topk_probs`` [N, k]}) and ``images``.

    Raises:
        EvalUsageError: a missing path, a model without text tower, labels that do not match the classes, or no
            usable samples.
    """
    setup = prepare_clip_eval(
        model,
        "zero-shot evaluation",
        "Use classify for a classifier.",
        distributed=distributed,
        group=group,
        precision=precision,
        progress=progress,
        transform=transform,
        tokenizer=tokenizer,
    )
    inner, shard, device, dtype, progress = setup.inner, setup.shard, setup.device, setup.dtype, setup.progress
    transform, tokenizer = setup.transform, setup.tokenizer

    ed = open_eval_data(
        data,
        transform=transform,
        batch_size=batch_size,
        shard=shard,
        labels=True,
        split=split,
        num_workers=num_workers,
        max_samples=max_samples,
    )
    bench_classes, bench_templates = clip_benchmark_files(data, split)
    if classnames is None and ed.classes_file is None and bench_classes is not None:
        classnames = bench_classes
    if templates is None and bench_templates is not None and classes_file_templates(ed.classes_file) is None:
        templates = bench_templates
    try:
        names, classes_source = _classnames_for(classnames, ed.classes, ed.classes_file, ed.kind)
        prompts, templates_source = resolve_templates(templates, ed.classes_file)
    except (ValueError, FileNotFoundError) as e:
        raise e if isinstance(e, EvalUsageError) else EvalUsageError(str(e)) from None

    with eval_mode(model):
        classifier = build_classifier(
            inner, names, prompts, tokenizer, batch_size=text_batch_size, precision=precision, shard=shard,
            progress=progress,
        )  # fmt: skip
        scale = logit_scale(inner)
        counter = TopKCounter(len(names), topk, confusion=confusion, keep_predictions=predictions_topk)
        images = classification_pass(
            inner,
            ed,
            inner.encode_image,
            lambda f: scale * F.normalize(f, dim=-1) @ classifier.T,
            counter,
            shard=shard,
            device=device,
            dtype=dtype,
            progress=progress,
            desc="zero-shot",
            keep_images=keep_images,
        )
    counter.reduce(shard)
    skipped = skipped_counts(ed, shard)
    if counter.count == 0:
        raise no_samples_error(ed, skipped, "zero-shot needs labelled images (ImageFolder, or shards with .cls)")
    details: dict[str, Any] = {"classes": names, "templates": prompts, "classifier": classifier.cpu()}
    if counter.confusion is not None:
        details["confusion_matrix"] = counter.confusion
    if predictions_topk:
        details["predictions"] = counter.prediction_tensors()
    if keep_images:
        details["images"] = torch.cat(images) if images else torch.zeros(0)
    model_label, pretrained = model_names(model_path, model_name)
    return EvalResult(
        task=TASK,
        metrics=counter.metrics(),
        dataset=dataset_name or ed.name,
        model=model_label,
        pretrained=pretrained,
        num_samples=counter.count,
        info={
            "num_classes": len(names),
            "classes": classes_source,
            "templates": templates_source,
            "num_templates": len(prompts),
            "skipped": skipped,
        },
        details=details,
    )
