"""NeVA (LLaVA-style) training: LLaVA JSON conversations -> image features spliced into the token embeddings ->
next-token cross-entropy on the answer tokens, averaged over every supervised token of the step.

The two stages of the NeVA document are configs of this one task:

* stage 1, feature alignment (``mm_cfg.llm.freeze`` and ``mm_cfg.vision_encoder.freeze`` true, template ``plain``):
  only the projector trains. Checkpoints leave out the frozen parts that the config loads from ``from_pretrained``
  (the config names them), so they hold the projector alone; a frozen part built at random (no ``from_pretrained``,
  the tiny recipe's towers) is saved, since nothing else could rebuild it;
* stage 2, end-to-end (the vision tower frozen, the projector and the LLM train): ``mm_cfg.pretrain_mm_mlp_adapter``
  names stage 1's checkpoint. Its projector is loaded, and so is every part that stage 1 built at random and this
  config builds at random too, so stage 2 continues the model whose projector stage 1 aligned.

The loss is a sum over supervised tokens divided by their number over the whole optimizer step -- every micro-batch
of the accumulation and every data-parallel rank (counted in :meth:`NevaTask.start_step`) -- so a long answer
weighs as much in a short batch as in a long one and the gradient is that of the global token average (LLaVA's
per-micro-batch mean is not, when batches hold different numbers of answer tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkit.config import ConfigError
from vlkit.models.neva import IGNORE_INDEX, IMAGE_TOKEN_INDEX, NevaModel
from vlkit.tasks.base import Batch, Task

# Held-out questions answered at each evaluation during training (greedy, batched), and their answer length limit.
EVAL_MAX_QUESTIONS = 1000
EVAL_MAX_NEW_TOKENS = 32
DEFAULT_SHAPES_VQA = "data/shapes-vqa/instruct_train.json"


class NevaTask(Task):
    """``model.arch=neva``: build the NeVA its config names (pretrained parts, stage-1 projector), train on LLaVA
    JSON (``data.kind: llava``, or ``synthetic_shapes_vqa`` for the built-in dataset), evaluate VQA answers."""

    name = "neva"

    def __init__(self, cfg, dist_info, dp=None) -> None:
        super().__init__(cfg, dist_info, dp)
        self.data = cfg.data
        self.model_config = cfg.model  # the built model's (a pretrained tower replaces the architecture)
        self.tokenizer_path: Path | None = None
        self.dataset: Any = None
        self._step_scale: torch.Tensor | None = None

    # -- building -------------------------------------------------------------------------------------------------
    @property
    def template(self) -> str:
        return self.data.conv_template or self.model_config.mm_cfg.llm.model_type

    def conversation_tokenizer(self) -> Any:
        """The template (with ``data.system_prompt`` when set) over the LLM tokenizer."""
        from vlkit.data.conversation import ConversationTokenizer, template_with_system
        from vlkit.data.tokenizer import get_tokenizer

        template = template_with_system(self.template, self.data.system_prompt)
        return ConversationTokenizer(get_tokenizer(self.tokenizer_path), template)

    def _resolve_data(self) -> None:
        """Write the synthetic dataset if asked for and missing; find the tokenizer."""
        check_stage1_adapter(self.cfg)  # before the dataset is written: a missing stage 1 is known in a millisecond
        data = self.cfg.data
        if data.kind == "synthetic_shapes_vqa":
            data = ensure_shapes_vqa(data, self.cfg.model.vision.img_h, self.dist.is_main)
        self.data = data
        self.tokenizer_path = resolve_tokenizer(self.cfg, data)

    def build_model(self) -> nn.Module:
        from vlkit.data.tokenizer import get_tokenizer
        from vlkit.interop.native import build_neva_model

        self._resolve_data()
        model, notes = build_neva_model(self.cfg.model)
        notes += base_from_stage1(model, self.cfg.model)
        notes += apply_neva_lora(model, self.cfg.model)  # after every base weight is in, before parallelize
        mc = model.config
        # What the checkpoints' config.json says: where the tokenizer is, and that the projector (which always
        # trains) is part of the weights now -- a loader must not go back to the stage-1 file for it.
        mm = dataclasses.replace(mc.mm_cfg, pretrain_mm_mlp_adapter=None)
        llm = dataclasses.replace(mc.llm, tokenizer=str(self.tokenizer_path))
        model.config = self.model_config = dataclasses.replace(mc, llm=llm, mm_cfg=mm)
        vocab = get_tokenizer(self.tokenizer_path).vocab_size
        if vocab > llm.vocab_size:
            raise ConfigError(
                f"the tokenizer at {self.tokenizer_path} has {vocab} tokens but model.llm.vocab_size is "
                f"{llm.vocab_size}: ids past the embedding table cannot be trained on"
            )
        if self.dist.is_main:  # where each part came from: worth seeing before a long run starts
            for note in notes:
                print(f"neva: {note}", flush=True)
        return model

    def prepare_model(self, model: nn.Module) -> None:
        # build_neva_model froze per mm_cfg already: requires_grad off (so the optimizer never sees those
        # parameters) and eval mode that NevaModel.train() keeps.
        if not isinstance(model, NevaModel):
            raise TypeError(f"the neva task trains a NevaModel, got {type(model).__name__}")

    def checkpoint_keys(self, model: nn.Module) -> set[str] | None:
        """Everything except the frozen parts the config reloads from ``from_pretrained`` (stage 1: the projector).
        With LoRA a part's base weights are frozen too: its adapters are saved, its base only when nothing else
        can rebuild it (no ``from_pretrained``)."""
        from vlkit.nn.lora import is_adapter_key

        mm = self.model_config.mm_cfg
        adapted = lora_towers(model)
        reloaded = tuple(
            f"{part}."
            for part, spec in (("vision_tower", mm.vision_encoder), ("llm", mm.llm))
            if (spec.freeze or part in adapted) and spec.from_pretrained
        )
        if not reloaded:
            return None
        names = (k.replace("_orig_mod.", "") for k in model.state_dict())
        return {k for k in names if is_adapter_key(k) or not k.startswith(reloaded)}

    def build_train_loader(self, micro_batch_size: int):
        from vlkit.data.llava import LlavaCollator, LlavaLoader

        self.dataset = self._dataset("train")
        vision = self.model_config.vision
        return LlavaLoader(
            self.dataset,
            micro_batch_size,
            LlavaCollator(self.dataset.tokenizer.tokenizer.pad_token_id, (vision.img_h, vision.img_w)),
            shuffle=True,
            seed=self.cfg.trainer.seed,
            rank=self.dp.rank,
            world_size=self.dp.size,
            num_workers=self.data.num_workers,
            pin_memory=self.dist.device.type == "cuda",
        )

    def _dataset(self, split: str):
        from vlkit.data.llava import build_llava_dataset

        mc = self.model_config
        return build_llava_dataset(self.data, split, self.conversation_tokenizer(), mc.vision,
                                   context_length=mc.llm.encoder_seq_length, image_tokens=self._image_tokens(),
                                   default_template=self.template)  # fmt: skip

    # -- the step -------------------------------------------------------------------------------------------------
    def start_step(self, batches: list[Batch]) -> None:
        """Count the step's supervised tokens over its micro-batches and the data-parallel ranks (no host sync)."""
        total = sum(supervised_tokens(b["labels"]) for b in batches)
        world = self.dp.size
        if world > 1:
            dist.all_reduce(total, group=self.dp_group)
        # The trainer averages micro-batch losses (1 / micro-batches) and DDP / FSDP average gradients over the
        # ranks (1 / ranks): scaling each micro-batch's token sum by micro-batches x ranks / total undoes both.
        self._step_scale = len(batches) * world / total.clamp(min=1).to(torch.float32)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"])
        token_sum = out["loss"] * out["num_tokens"]  # the model's mean is over this micro-batch's tokens
        if self._step_scale is not None:
            loss = token_sum * self._step_scale
        else:  # called outside a trainer step: this batch's own token average
            loss = token_sum / out["num_tokens"].clamp(min=1)
        metrics = {}
        if self.dataset is not None:
            stats = self.dataset.stats
            metrics["masked_samples"] = float(stats.get("tokenization_mismatch", 0) + stats.get("all_masked", 0))
        return loss, metrics

    def batch_size(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: Batch) -> int | None:
        return int(supervised_tokens(batch["labels"]))

    # -- FLOPs ----------------------------------------------------------------------------------------------------
    def train_flops(self, batch: Batch) -> int | None:
        """Every row's image through the vision tower and projector (forward, plus backward where something below
        trains) and the LLM over the spliced, padded length, forward + backward."""
        length = spliced_length(batch["input_ids"], batch["attention_mask"], self._image_tokens())
        image, llm_linear, llm_quadratic = self._flop_coefficients()
        rows = self.batch_size(batch)
        return rows * (image + llm_linear * length + llm_quadratic * length * length)

    def _image_tokens(self) -> int:
        from vlkit.data.llava import image_token_count

        mc = self.model_config
        return image_token_count(mc.vision, class_token_length=mc.mm_cfg.vision_encoder.class_token_length,
                                 use_im_start_end=mc.mm_cfg.use_im_start_end)  # fmt: skip

    @functools.cache  # noqa: B019 (one task per run)
    def _flop_coefficients(self) -> tuple[int, int, int]:
        """(image FLOPs, a, b) with the LLM's FLOPs at length L exactly a L + b L^2 (linear layers and the head grow
        with L, attention with L^2): two traces on the meta device fit every length."""
        from vlkit.models import create_model
        from vlkit.utils.flops import tower_flops

        meta = create_model(self.model_config, device="meta")
        n = 64
        short, long_ = tower_flops(meta, n), tower_flops(meta, 2 * n)
        f1, f2 = short["llm"].forward_backward, long_["llm"].forward_backward
        quadratic = (f2 - 2 * f1) // (2 * n * n)
        linear = (f1 - quadratic * n * n) // n
        return short["image"].forward_backward, linear, quadratic

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int, out_dir: Any) -> dict[str, float]:
        """Greedy answers to the held-out questions (``data.val_path``), exact match and VQA accuracy."""
        if not self.data.val_path:
            return {}
        from vlkit.data.llava import image_transform
        from vlkit.eval.runtime import autocast_dtype, eval_mode
        from vlkit.eval.vqa import Assistant, evaluate_vqa
        from vlkit.utils.modules import model_device, unwrap

        inner = unwrap(model)
        device = model_device(inner)
        precision = self.cfg.trainer.precision if self.cfg.trainer.precision in ("fp32", "bf16", "fp16") else "fp32"
        chat = self.conversation_tokenizer()
        transform = image_transform(self.model_config.vision, self.data.image_aspect_ratio)
        assistant = Assistant(model, chat, transform, autocast_dtype(precision, device))
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), eval_mode(model):
            result = evaluate_vqa(
                assistant,
                self.data.val_path,
                image_folder=self.data.image_folder,
                batch_size=max(self.cfg.trainer.micro_batch_size, 16),
                max_new_tokens=EVAL_MAX_NEW_TOKENS,
                max_samples=EVAL_MAX_QUESTIONS,
                group=self.dp_group,
                dataset_name=self.data.val_path,
                model_name=self.cfg.name,
                model_path=f"{self.cfg.name}@step{step}",
            )
        if out_dir is not None and self.dist.is_main:
            result.write_json(Path(out_dir) / "eval" / f"step_{step:08d}_vqa.json")
        return {f"eval/vqa/{k}": float(v) for k, v in result.metrics.items()}


# ---------------------------------------------------------------------------------------------------------- helpers


def supervised_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a [B, T] label batch: labels[:, 1:] that are not IGNORE_INDEX (splicing adds none)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def spliced_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: int) -> int:
    """The padded length of a batch once every placeholder becomes ``image_tokens`` positions."""
    real = attention_mask.bool()
    placeholders = ((input_ids == IMAGE_TOKEN_INDEX) & real).sum(1)
    return int((real.sum(1) + placeholders * (image_tokens - 1)).max())


def check_stage1_adapter(cfg: Any) -> None:
    """Refuse a stage-2 config whose ``model.mm_cfg.pretrain_mm_mlp_adapter`` names nothing: stage 1 was not run
    (``neva-tiny-finetune`` before ``neva-tiny-pretrain``). Only existence is checked here; what the path holds is
    read (and checked) when the model is built."""
    from vlkit.utils.errors import UserError

    mm = cfg.model.mm_cfg
    if mm is None or not mm.pretrain_mm_mlp_adapter or Path(mm.pretrain_mm_mlp_adapter).exists():
        return
    name = str(cfg.name or "")
    stage1 = name[: -len("-finetune")] + "-pretrain" if name.endswith("-finetune") else "the stage-1 (pretrain) config"
    raise UserError(
        f"run {stage1} first (model.mm_cfg.pretrain_mm_mlp_adapter={mm.pretrain_mm_mlp_adapter} does not exist; "
        "it is where stage 1 leaves the projector)"
    )


def ensure_shapes_vqa(data_cfg: Any, image_size: int, is_main: bool) -> Any:
    """``data.kind: synthetic_shapes_vqa``: write ``vlkit data shapes-vqa``'s dataset in ``data.train_path``'s folder
    once (rank 0; ``data.dataset_size`` training images, default 5000, a tenth of that held out), then read it as
    LLaVA JSON: ``train_path`` a file of it (a folder means its ``instruct_train.json``), ``val_path`` by default
    the matching ``_val.json``.

    Raises:
        ValueError: the folder holds files the generator did not write.
    """
    import json

    from vlkit.data.shapes_vqa import GENERATOR, INDEX_FILE, write_shapes_vqa

    path = Path(data_cfg.train_path or DEFAULT_SHAPES_VQA)
    is_file = path.suffix in (".json", ".jsonl")
    root = path.parent if is_file else path
    train = path if is_file else root / "instruct_train.json"
    index = root / INDEX_FILE
    if is_main and not index.is_file():
        n = data_cfg.dataset_size or 5000
        write_shapes_vqa(root, train=n, val=max(100, n // 10), size=image_size)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if json.loads(index.read_text(encoding="utf-8")).get("generator") != GENERATOR:
        raise ValueError(f"data.train_path={data_cfg.train_path}: {index} was not written by {GENERATOR}")
    val = data_cfg.val_path or str(train.with_name(train.name.replace("_train", "_val")))
    return dataclasses.replace(data_cfg, kind="llava", train_path=str(train), val_path=val, dataset_size=None)


def resolve_tokenizer(cfg: Any, data: Any) -> Path:
    """The LLM tokenizer: ``model.llm.tokenizer``; else, for the synthetic dataset, its ``tokenizer/``; else
    ``mm_cfg.llm.from_pretrained``'s directory (a Hugging Face LLaMA directory carries its tokenizer.json).

    Raises:
        ValueError: none is set; FileNotFoundError: the path does not exist.
    """
    llm, mm = cfg.model.llm, cfg.model.mm_cfg
    if llm.tokenizer:
        key, path = "model.llm.tokenizer", Path(llm.tokenizer)
    elif cfg.data.kind == "synthetic_shapes_vqa":
        key, path = "data.train_path", Path(data.train_path).parent / "tokenizer"
    elif mm is not None and mm.llm.from_pretrained:
        from vlkit.interop.neva import resolve_pretrained

        key = "model.mm_cfg.llm.from_pretrained"
        path = resolve_pretrained(mm.llm.from_pretrained, key)
    else:
        raise ValueError(
            "model.llm.tokenizer is not set: the NeVA task needs the language model's tokenizer (a tokenizer.json or "
            "a directory holding one); it defaults to model.mm_cfg.llm.from_pretrained's directory"
        )
    if not path.exists():
        raise FileNotFoundError(f"{key}: the tokenizer {path} does not exist")
    return path.resolve()


def lora_towers(model: nn.Module) -> set[str]:
    """The parts of a NeVA (``llm``, ``vision_tower``) that hold LoRA adapters."""
    from vlkit.nn.lora import lora_layers

    return {name.replace("_orig_mod.", "").split(".", 1)[0] for name in lora_layers(model)}


def apply_neva_lora(model: NevaModel, model_cfg: Any) -> list[str]:
    """``model.peft.lora`` (rank > 0): adapters on the named projections (bare names: the LLM's), every base weight
    of an adapted part frozen and the part kept in train mode (the adapters' dropout); the projector (and the
    start/end embeddings) train as always, the vision tower unless ``mm_cfg`` freezes it. Returns notes."""
    from vlkit.config.validate import lora_targets
    from vlkit.nn.lora import apply_lora, mark_only_lora_trainable

    peft = getattr(model_cfg, "peft", None)
    lora = peft.lora if peft is not None else None
    if lora is None or not lora.rank:
        return []
    try:
        targets = lora_targets(model_cfg)
        wrapped = apply_lora(model, targets, lora.rank, lora.alpha, lora.dropout, default_towers=("llm",))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    parts = sorted({name.split(".", 1)[0] for name in wrapped})
    for part in parts:
        mark_only_lora_trainable(getattr(model, part))
    model.frozen = tuple(name for name in model.frozen if name not in parts)
    model.train(model.training)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return [f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {len(wrapped)} layers of {', '.join(parts)}: "
            f"{adapters:,} of {total:,} parameters train ({100 * adapters / total:.1f} %)"]  # fmt: skip


def base_from_stage1(model: NevaModel, model_cfg: Any) -> list[str]:
    """Load the parts that stage 1 built at random (and saved) and this config builds at random too, from the
    ``pretrain_mm_mlp_adapter`` checkpoint; returns notes. Parts this config loads from ``from_pretrained`` win."""
    from vlkit.interop.neva import adapter_weights

    mm = model_cfg.mm_cfg
    if mm is None or not mm.pretrain_mm_mlp_adapter:
        return []
    file, state = adapter_weights(Path(mm.pretrain_mm_mlp_adapter))
    notes = []
    for part, spec in (("vision_tower", mm.vision_encoder), ("llm", mm.llm)):
        prefix = f"{part}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if spec.from_pretrained or not sub:
            continue
        try:
            getattr(model, part).load_state_dict(sub)
        except RuntimeError as e:
            raise ValueError(f"model.mm_cfg.pretrain_mm_mlp_adapter={file}: its {part} does not fit ({e})") from None
        notes.append(f"{part} from {file} (stage 1 built it at random and saved it)")
    return notes
