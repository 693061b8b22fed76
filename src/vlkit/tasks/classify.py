"""Image classification: a ViT classifier (``model.arch=vit_classifier``) trained with cross-entropy.

Data: an ImageFolder (``<root>/<class>/<image>``, the layout ``vlkit data shapes --classification`` writes per split),
webdataset shards with an integer ``cls`` member, or ``synthetic_shapes`` (the ImageFolder shapes dataset, written on
first use). Augmentation: RandomResizedCrop (``data.crop_scale``), flip, a torchvision policy, random erasing
(:func:`vlkit.data.transforms.get_transform`); mixup / cutmix on the batch (:mod:`vlkit.data.mixup`); label smoothing.
Options: starting from a checkpoint (a classifier or a CLIP's vision tower, position embeddings resampled to this
resolution), layer-wise lr decay (``vlkit.train.optim``) and a linear probe (frozen backbone); the trainer's EMA of the
weights (``trainer.ema_decay``) works as for any task. The class names are written as ``classes.json`` next to the
checkpoints and into every model directory the trainer exports, where ``vlkit predict`` finds them. See
docs/classification.md.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.load import ConfigError
from vlkit.config.schema import Config, VisionConfig
from vlkit.data.mixup import Mixup, soft_target_cross_entropy
from vlkit.models import create_model
from vlkit.tasks.base import Batch, Task

log = logging.getLogger("vlkit.train")

CLASSES_FILE = "classes.json"
DATA_KINDS = ("imagefolder", "webdataset", "synthetic_shapes")
# What a pretrained backbone brings with it: the keys that shape its weights or the function they compute, and its
# preprocessing. Resolution, dropout, drop path and checkpointing stay the run's own.
VISION_ARCH_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "activation",
    "normalization",
    "layernorm_epsilon",
    "bias",
    "patch_dim",
    "num_channels",
    "class_token_length",
    "pre_norm",
    "patch_bias",
    "image_mean",
    "image_std",
    "crop_style",
    "resize_interpolation",
)


def config_problems(cfg: Config) -> list[str]:
    """What the classify task cannot run with, each naming its key (empty: fine)."""
    p: list[str] = []
    d, m = cfg.data, cfg.model
    if m.arch != "vit_classifier":
        p.append(f"model.arch={m.arch!r}: the classify task trains vit_classifier models")
    if d.kind not in DATA_KINDS:
        p.append(f"data.kind={d.kind!r} is not one of {', '.join(DATA_KINDS)} (the classify task's data)")
    for key, value in (
        ("data.hflip", d.hflip),
        ("data.reprob", d.reprob),
        ("data.mixup_prob", d.mixup_prob),
        ("data.mixup_switch_prob", d.mixup_switch_prob),
        ("model.label_smoothing", m.label_smoothing),
    ):
        if not 0.0 <= value <= 1.0:
            p.append(f"{key}={value} must be in [0, 1]")
    for key, value in (("data.mixup", d.mixup), ("data.cutmix", d.cutmix)):
        if value < 0:
            p.append(f"{key}={value} must be >= 0 (0: off)")
    if d.auto_augment:
        from vlkit.data.transforms import auto_augment_transform

        try:
            auto_augment_transform(d.auto_augment)
        except ValueError as e:
            p.append(str(e))
    if cfg.trainer.gradient_cache:
        p.append("trainer.gradient_cache=true: a classification loss has no cacheable features; use plain accumulation")
    return p


class ClassifyTask(Task):
    name = "classify"
    supports_gradient_cache = False

    def __init__(self, cfg: Config, dist_info: Any, dp: Any = None) -> None:
        super().__init__(cfg, dist_info, dp)
        problems = config_problems(cfg)
        if problems:
            raise ConfigError("invalid config for the classify task:\n  " + "\n  ".join(problems))
        d, m = cfg.data, cfg.model
        self.mixup = None
        if d.mixup > 0 or d.cutmix > 0:
            self.mixup = Mixup(m.num_classes, d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob, m.label_smoothing)
        self.val_path: str | None = d.val_path
        self.classes: list[str] | None = None
        self.frozen: list[nn.Module] = []

    # -- the model ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if not self.cfg.model.init_from:
            return create_model(self.cfg)
        try:
            model, self.cfg, notes = init_from_checkpoint(self.cfg)
        except ValueError as e:  # a wrong path or an unusable checkpoint is a config problem: exit 2, no traceback
            raise ConfigError(str(e)) from e
        if self.dist.is_main:
            for note in notes:
                print(f"init_from: {note}", flush=True)
        return model

    def prepare_model(self, model: nn.Module) -> None:
        if self.cfg.model.linear_probe:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            self.frozen = [model.backbone]

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        for m in self.frozen:  # a probed backbone computes what it will compute at test time (no dropout)
            m.eval()

    # -- data -----------------------------------------------------------------------------------------------------
    def build_train_loader(self, micro_batch_size: int):
        from vlkit.data.transforms import get_transform

        data = self.cfg.data
        if data.kind == "synthetic_shapes":
            from vlkit.tasks.clip import ensure_shapes_dataset

            data = ensure_shapes_dataset(data, self.cfg.model.vision.img_h, self.dist.is_main, classification=True)
        if not data.train_path:
            raise ValueError(f"data.train_path is not set (data.kind={data.kind})")
        self.val_path = data.val_path
        transform = get_transform(
            self.cfg.model,
            train=True,
            scale=tuple(data.crop_scale) if data.crop_scale is not None else None,
            hflip=data.hflip,
            auto_augment=data.auto_augment,
            random_erasing=data.reprob,
        )
        try:
            loader, classes = self._open_train_data(data, transform, micro_batch_size)
        except (OSError, ValueError) as e:  # a missing folder, no shards, a bad classes.json: exit 2, no traceback
            raise ConfigError(f"data.train_path={data.train_path}: {e}") from e
        self._set_classes(classes, data.train_path)
        return loader

    def _open_train_data(self, data: Any, transform: Any, micro_batch_size: int) -> tuple[Any, list[str] | None]:
        seed = self.cfg.trainer.seed
        if data.kind == "imagefolder":
            from vlkit.data.imagefolder import ImageFolder, ImageFolderLoader

            path = Path(data.train_path)
            dataset = ImageFolder(path, transform=transform, classes=_classes_file_near(path))
            loader = ImageFolderLoader(dataset, micro_batch_size, num_workers=data.num_workers, seed=seed,
                                       rank=self.dp.rank, world_size=self.dp.size)  # fmt: skip
            return loader, list(dataset.classes)
        from vlkit.data.loaders import loader_from_config

        # Image-only samples: no caption member is required, the label comes from the "cls" member.
        image_only = replace(data, text_key=None)
        loader = loader_from_config(image_only, batch_size=micro_batch_size, image_transform=transform,
                                    tokenizer=None, seed=seed, label_key="cls", rank=self.dp.rank,
                                    world_size=self.dp.size)  # fmt: skip
        classes_file = _classes_file_for_shards(data.train_path)
        return loader, _read_classes(classes_file) if classes_file is not None else None

    def _set_classes(self, classes: list[str] | None, where: str) -> None:
        """Check the class count against the head, and save the names where ``vlkit predict`` looks for them."""
        n = self.cfg.model.num_classes
        if classes is not None and len(classes) != n:
            raise ConfigError(f"data.train_path={where}: {len(classes)} classes, but model.num_classes={n}")
        self.classes = classes
        if classes is None or not self.dist.is_main:
            return
        from vlkit.data.imagefolder import write_class_index

        tcfg = self.cfg.trainer
        out = Path(tcfg.output_dir)
        for folder in {out, Path(tcfg.checkpoint.dir) if tcfg.checkpoint.dir else out / "checkpoints"}:
            folder.mkdir(parents=True, exist_ok=True)
            write_class_index(folder / CLASSES_FILE, classes)

    # -- the step -------------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch["image"], batch["label"]
        self._check_labels(labels, batch)
        if self.mixup is not None:
            images, targets, params = self.mixup(images, labels, batch.get("mix_seed"))
            logits = model(images)
            loss = soft_target_cross_entropy(logits, targets)
            # Accuracy against each image's dominant label (its own unless the pasted / blended partner weighs more).
            hard = labels if params.lam >= 0.5 else labels.flip(0)
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.model.label_smoothing)
            hard = labels
        acc = (logits.detach().argmax(dim=-1) == hard).float().mean()
        return loss, {"train_acc1": float(acc)}

    def _check_labels(self, labels: torch.Tensor, batch: Batch) -> None:
        n = self.cfg.model.num_classes
        bad = (labels < 0) | (labels >= n)
        if bool(bad.any()):  # cross-entropy on CUDA would die in a device assert that names nothing
            i = int(bad.nonzero()[0, 0])
            key = batch.get("key", [None] * len(labels))[i]
            raise ValueError(f"sample {key!r}: label {int(labels[i])} is outside model.num_classes={n}")

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int, out_dir: Any) -> dict[str, float]:
        """Held-out top-1 / top-5 (``eval/classify/*``; the trainer names its weight average's
        ``eval/classify_ema/*``)."""
        if not self.val_path:
            return {}
        from vlkit.eval import run_eval_during_training

        return run_eval_during_training(model, self.cfg, step, out_dir=out_dir, tasks=("classify",),
                                        data=self.val_path, group=self.dp_group)  # fmt: skip

    def model_dir_files(self, path: Path) -> None:
        """The class names beside the weights, where ``vlkit predict`` finds them."""
        if self.classes is not None:
            from vlkit.data.imagefolder import write_class_index

            write_class_index(path / CLASSES_FILE, self.classes)

    # -- accounting -----------------------------------------------------------------------------------------------
    def batch_size(self, batch: Batch) -> int:
        return int(batch["image"].shape[0])

    def train_flops(self, batch: Batch) -> int | None:
        return self.batch_size(batch) * self._flops_per_sample()

    @functools.cache  # noqa: B019 (one task per run)
    def _flops_per_sample(self) -> int:
        from vlkit.utils.flops import tower_flops

        meta = create_model(self.cfg, device="meta")
        return tower_flops(meta)["image"].forward_backward


# ---------------------------------------------------------------------------------------------- starting weights


def init_from_checkpoint(cfg: Config) -> tuple[nn.Module, Config, list[str]]:
    """The classifier ``cfg`` describes, its backbone (and head, when it fits) loaded from ``cfg.model.init_from``.

    The source is anything :func:`vlkit.load_model` reads (a vlkit model or checkpoint directory, or a run directory
    whose latest checkpoint is taken; converted Hugging Face / open_clip models too): a ViT classifier, or a CLIP
    model whose ``.visual`` tower is taken without its projection. The backbone's :data:`VISION_ARCH_KEYS` come from
    the source; the rest (resolution, dropout, ...) from ``cfg``. Position embeddings are resampled to this
    config's grid on load (bicubic, class-token positions kept), so a 224-px checkpoint starts a 512-px model.

    Returns:
        (model, the config with the source's vision keys, notes on what was taken or left out).

    Raises:
        ValueError: the source cannot be read, has no ViT backbone, or its weights do not fit; naming the path.
    """
    import vlkit
    from vlkit.interop.native import resolve_model_path

    path = cfg.model.init_from
    try:
        source = vlkit.load_model(resolve_model_path(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"model.init_from={path}: {e}") from e
    tower = getattr(source, "backbone", None)
    if tower is None:
        tower = getattr(source, "visual", None)
    src_vision = getattr(tower, "config", None)
    if not isinstance(src_vision, VisionConfig):
        raise ValueError(f"model.init_from={path}: a {type(source).__name__} has no ViT backbone or .visual tower")
    ours = cfg.model.vision
    taken = {k: getattr(src_vision, k) for k in VISION_ARCH_KEYS}
    notes = [f"model.vision.{k}={v!r} from the checkpoint (config had {getattr(ours, k)!r})"
             for k, v in taken.items() if getattr(ours, k) != v]  # fmt: skip
    cfg = replace(cfg, model=replace(cfg.model, vision=replace(ours, **taken, output_dim=None)))
    model = create_model(cfg)
    # The projection into a CLIP's joint space is not part of a classifier's backbone.
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith("proj.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model.init_from={path}: backbone weights do not fit (missing {missing}, unexpected "
                         f"{unexpected})")  # fmt: skip
    if src_vision.grid_size != cfg.model.vision.grid_size:
        notes.append(f"position embeddings resampled from a {src_vision.grid_size} to a "
                     f"{cfg.model.vision.grid_size} patch grid")  # fmt: skip
    head = getattr(source, "head", None)
    if isinstance(head, nn.Linear) and head.weight.shape == model.head.weight.shape:
        model.head.load_state_dict(head.state_dict())
        notes.append("head loaded from the checkpoint")
    else:
        why = f"{head.out_features} classes there" if isinstance(head, nn.Linear) else "a CLIP tower has none"
        notes.append(f"head initialised to zero for {cfg.model.num_classes} classes ({why})")
    return model, cfg, notes


# ------------------------------------------------------------------------------------------------------------ data


def _classes_file_near(folder: Path) -> Path | None:
    """``classes.json`` in the split folder or the dataset root above it (where ``vlkit data shapes`` puts it)."""
    for candidate in (folder / CLASSES_FILE, folder.parent / CLASSES_FILE):
        if candidate.is_file():
            return candidate
    return None


def _classes_file_for_shards(spec: str) -> Path | None:
    from vlkit.data.sources import expand_urls, is_remote

    urls = expand_urls(spec.split("::")[0])
    return None if not urls or is_remote(urls[0]) else _classes_file_near(Path(urls[0]).parent)


def _read_classes(path: Path) -> list[str]:
    from vlkit.data.imagefolder import read_class_index

    return read_class_index(path)[0]
