"""CLIP: image-text pairs -> normalised features -> exact contrastive loss (local, gathered or ring across ranks)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkit.config import ConfigError
from vlkit.losses import ContrastiveLoss
from vlkit.models import create_model
from vlkit.models.text import eot_positions
from vlkit.tasks.base import Batch, Task


def _lock(module: nn.Module, blocks: nn.ModuleList, unlocked: int, keep_trainable: list[nn.Module]) -> list[nn.Module]:
    """Freeze ``module`` except its last ``unlocked`` blocks and, when any are unlocked, the head modules after them.

    Returns the modules that must stay in eval mode (the frozen ones)."""
    for p in module.parameters():
        p.requires_grad_(False)
    if unlocked <= 0:
        return [module]
    trainable = list(blocks[len(blocks) - unlocked :]) + keep_trainable
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    return [b for b in blocks[: len(blocks) - unlocked]]


def apply_clip_lora(model: nn.Module, m: Any) -> None:
    """``model.peft.lora`` (rank > 0) on a CLIP: adapters on the named projections (bare names: both towers), each
    adapted tower's base frozen. (A locked tower is never adapted: the config refuses both on one tower.)"""
    lora = m.peft.lora if m.peft is not None else None
    if lora is None or not lora.rank:
        return
    from vlkit.config.validate import lora_targets
    from vlkit.nn.lora import apply_lora, mark_only_lora_trainable

    wrapped = apply_lora(model, lora_targets(m), lora.rank, lora.alpha, lora.dropout, default_towers=("visual", "text"))
    for tower in sorted({name.split(".", 1)[0] for name in wrapped}):
        mark_only_lora_trainable(getattr(model, tower))


class CLIPTask(Task):
    name = "clip"
    supports_gradient_cache = True

    def __init__(self, cfg, dist_info, dp=None) -> None:
        super().__init__(cfg, dist_info, dp)
        m = cfg.model
        # Features are gathered over the data-parallel ranks only: tensor-parallel peers hold the same rows.
        group = self.dp_group if self.dp_group is not None else "world"
        self.loss_fn = ContrastiveLoss(m.loss_impl, m.local_loss, m.gather_with_grad, group=group)
        self.frozen: list[nn.Module] = []
        self.val_path: str | None = cfg.data.val_path

    def build_model(self) -> nn.Module:
        return create_model(self.cfg)

    def prepare_model(self, model: nn.Module) -> None:
        m = self.cfg.model
        frozen = []
        if m.lock_image:
            v = model.visual
            head = [x for x in (v.norm, v.proj) if x is not None]
            frozen += _lock(v, v.transformer.blocks, m.lock_image_unlocked_groups, head)
        if m.lock_text:
            t = model.text
            head = [x for x in (t.norm, t.proj) if x is not None]
            frozen += _lock(t, t.transformer.blocks, m.lock_text_unlocked_layers, head)
        self.frozen = frozen
        apply_clip_lora(model, m)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        for m in self.frozen:  # frozen towers keep eval behaviour (no dropout, no drop path)
            m.eval()

    # -- data -----------------------------------------------------------------------------------------------------
    def build_train_loader(self, micro_batch_size: int):
        from vlkit.data.loaders import loader_from_config
        from vlkit.data.tokenizer import get_tokenizer
        from vlkit.data.transforms import get_transform

        data = self.cfg.data
        if data.kind == "synthetic_shapes":
            data = ensure_shapes_dataset(data, self.cfg.model.vision.img_h, self.dist.is_main)
        self.val_path = data.val_path
        text = self.cfg.model.text
        tokenizer = get_tokenizer(text.tokenizer, text.encoder_seq_length)
        if tokenizer.vocab_size > text.vocab_size:  # an id past the embedding table fails deep inside the model
            raise ConfigError(f"model.text.vocab_size={text.vocab_size} is smaller than the {text.tokenizer!r} "
                              f"tokenizer's {tokenizer.vocab_size} tokens: ids past the embedding table cannot be "
                              "embedded")  # fmt: skip
        return loader_from_config(
            data,
            batch_size=micro_batch_size,
            image_transform=get_transform(self.cfg.model, train=True, scale=_scale(data.clip_crop_scale)),
            tokenizer=tokenizer,
            train=True,
            seed=self.cfg.trainer.seed,
            rank=self.dp.rank,
            world_size=self.dp.size,
        )

    # -- the step -------------------------------------------------------------------------------------------------
    def features(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return model(batch["image"], batch["text"])

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss_fn(feats["image_features"].float(), feats["text_features"].float(), feats["logit_scale"])
        return loss, {"logit_scale": float(feats["logit_scale"].detach())}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_from_features(self.features(model, batch))

    def evaluate(self, model: nn.Module, step: int, out_dir: Any) -> dict[str, float]:
        """Zero-shot and retrieval on the held-out split (when there is one), sharded over the data-parallel ranks."""
        if not getattr(self, "val_path", None):
            return {}
        from vlkit.eval import run_eval_during_training

        return run_eval_during_training(model, self.cfg, step, data=self.val_path, group=self.dp_group, out_dir=out_dir)

    def after_optimizer_step(self, model: nn.Module) -> None:
        # The clamp also applies in forward; clamping the stored value too keeps it from drifting far above, where
        # its gradient is zero and it could never come back (open_clip does the same after every step).
        with torch.no_grad():
            model.logit_scale.clamp_(0, self.cfg.model.logit_scale_max)

    def batch_size(self, batch: Batch) -> int:
        return int(batch["image"].shape[0])

    def train_flops(self, batch: Batch) -> int | None:
        """Image tower plus text tower at the batch's real (padding-trimmed) length, forward + backward."""
        text = self.cfg.model.text
        length = int(eot_positions(batch["text"], text.eot_token_id, text.pad_token_id).max()) + 1
        image, c, a, b = self._flop_coefficients()
        return self.batch_size(batch) * (image + c + a * length + b * length * length)

    @functools.cache  # noqa: B019 (one task per run)
    def _flop_coefficients(self) -> tuple[int, int, int, int]:
        """(image FLOPs per sample, c, a, b) with the text tower's FLOPs at length L exactly c + a L + b L^2
        (the pooled projection is constant, linear layers grow with L, attention with L^2): three traces on the meta
        device serve every caption length."""
        from vlkit.utils.flops import tower_flops

        meta = create_model(self.cfg, device="meta")
        n = 8
        f1, f2, f3 = (tower_flops(meta, k * n) for k in (1, 2, 3))
        t1, t2, t3 = (f["text"].forward_backward for f in (f1, f2, f3))
        b = (t3 - 2 * t2 + t1) // (2 * n * n)
        a = (t2 - t1 - 3 * b * n * n) // n
        c = t1 - a * n - b * n * n
        return f1["image"].forward_backward, c, a, b


def _scale(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def ensure_shapes_dataset(data_cfg: Any, image_size: int, is_main: bool, classification: bool = False) -> Any:
    """Write the synthetic shapes dataset at ``data.train_path``'s root once (rank 0), then point the config at it.

    ``classification``: the ImageFolder layout (``vlkit data shapes --classification``) instead of shards."""
    import json
    from dataclasses import replace

    from vlkit.data.shapes import write_shapes_dataset

    root = Path(data_cfg.train_path or "data/shapes")
    if root.name in ("train", "val"):
        root = root.parent
    layout = "imagefolder" if classification else "webdataset"
    index = root / "classes.json"
    if is_main and not index.is_file():
        size = data_cfg.dataset_size or 20000
        write_shapes_dataset(root, train=size, val=max(500, size // 20), size=image_size, classification=classification)
    if dist.is_initialized():
        dist.barrier()
    found = json.loads(index.read_text(encoding="utf-8")).get("format", "webdataset")
    if found != layout:
        raise ValueError(f"data.train_path={data_cfg.train_path}: {root} holds the shapes dataset as {found}, this "
                         f"task reads {layout}; point data.train_path at another folder")  # fmt: skip
    return replace(
        data_cfg,
        kind=layout,
        train_path=str(root / "train"),
        val_path=str(root / "val"),
        dataset_size=None,
    )
