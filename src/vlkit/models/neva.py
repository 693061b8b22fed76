"""NeVA, a LLaVA-style assistant: a CLIP ViT read at one layer, a projector into the language model's embedding
space, and a LLaMA-architecture decoder that reads the image features spliced into its token embeddings.

input_ids [B, T] with IMAGE_TOKEN_INDEX (-200) where each image goes
  -> token embeddings, each placeholder replaced by ([im_start] +) projector(vision features) (+ [im_end])
  -> LlamaDecoder -> logits [B, T', vocab] (+ next-token loss on the spliced labels; image positions never supervised)

The model does no I/O: :func:`vlkit.interop.neva.build_neva_model` loads the pretrained parts that
``model.mm_cfg`` names. Which parts train is ``mm_cfg.vision_encoder.freeze`` / ``mm_cfg.llm.freeze``; a frozen part
has ``requires_grad=False`` and stays in eval mode through ``model.train()`` (see :func:`freeze`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config.schema import MMConfig, ModelConfig, VisionConfig
from vlkit.models.generate import GenerateOutput, generate
from vlkit.models.llama import INIT_STD, LlamaDecoder
from vlkit.models.vit import VisionTransformer
from vlkit.nn import KVCache

#: The id of the ``<image>`` placeholder in ``input_ids`` (LLaVA's value; the same constant as
#: ``vlkit.data.conversation.IMAGE_TOKEN_INDEX``, defined here too because models sit below data).
IMAGE_TOKEN_INDEX = -200
#: Label of an unsupervised position (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100
PROJECTOR_TYPES = re.compile(r"linear|mlp([1-9][0-9]*)x_gelu")
# The parts freeze() can freeze, by their attribute names (also the prefixes of their state-dict keys).
FREEZABLE = ("vision_tower", "llm")


# -- the vision encoder: a CLIP tower cut after the layer LLaVA reads ------------------------------------------------
def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """The number of blocks to run for transformers' ``hidden_states[select_layer]`` of a ``num_layers`` tower."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"select_layer={select_layer} is outside the {num_layers + 1} hidden states of a {num_layers}-layer "
            f"tower (valid: {-(num_layers + 1)}..{num_layers})"
        )
    return index


class VisionEncoder(nn.Module):
    """A CLIP image tower cut after the selected layer: ``forward(pixels [B, 3, H, W]) -> [B, tokens, hidden_size]``.

    Blocks after the selected one, the final norm and the projection are dropped (never run, no parameters), so
    the module can be trained or frozen as a whole. ``tokens`` is the patch count, plus the class token(s) when
    they are kept.

    Attributes:
        config: the VisionConfig of what is kept (``num_layers`` = blocks run, no ``output_dim``).
        hidden_size: the feature size (the NeVA projector's input).
        select_layer: the index this encoder was cut at, as given.
    """

    def __init__(self, tower: VisionTransformer, select_layer: int = -2, drop_class_token: bool = True) -> None:
        super().__init__()
        keep = hidden_state_index(select_layer, tower.config.num_layers)
        tower.transformer.blocks = tower.transformer.blocks[:keep]
        tower.norm = nn.Identity()
        tower.proj = None
        tower.config = replace(tower.config, num_layers=keep, output_dim=None)
        self.tower = tower
        self.config: VisionConfig = tower.config
        self.hidden_size = tower.config.hidden_size
        self.select_layer = select_layer
        self.drop_class_token = drop_class_token

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (0 if self.drop_class_token else self.tower.num_prefix_tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tower.transformer(self.tower.embed(pixels))
        return x[:, self.tower.num_prefix_tokens :] if self.drop_class_token else x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()}


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Sequential:
    """``linear``: one Linear; ``mlpNx_gelu``: N Linears with GELU between them (LLaVA-1.5's ``mlp2x_gelu``).

    Always a Sequential, so the weights are ``projector.0.*``, ``projector.2.*``, ... for every type."""
    match = PROJECTOR_TYPES.fullmatch(kind)
    if match is None:
        raise ValueError(f"model.mm_cfg.mm_mlp_adapter_type={kind!r} is not one of linear, mlp2x_gelu, mlpNx_gelu")
    depth = int(match.group(1) or 1)
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


class SplicedInputs(NamedTuple):
    """The LLM's view of a batch after splicing; every tensor is [B, L] (embeddings [B, L, hidden])."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor  # long, 1 for real positions (text and image), 0 for padding
    position_ids: torch.Tensor  # 0, 1, ... from each row's first real position
    labels: torch.Tensor | None  # IGNORE_INDEX at image positions and padding; None without labels
    input_ids: torch.Tensor  # text ids, IMAGE_TOKEN_INDEX at image positions, the pad id at padding


class NevaModel(nn.Module):
    """``model.arch=neva``: ``vision_tower`` (a :class:`VisionEncoder`) -> ``projector`` -> ``llm``
    (a :class:`LlamaDecoder`), plus ``im_start`` / ``im_end`` with ``mm_cfg.use_im_start_end``.

    The vision tower is built from ``model.vision`` (the whole CLIP tower's config) and cut after
    ``mm_cfg.vision_encoder.vision_select_layer`` (transformers' ``hidden_states`` index); its first
    ``class_token_length`` tokens are dropped. Built on any device (``meta`` included); freezing follows the config.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.llm is None:
            raise ValueError("model.arch=neva needs a model.llm section")
        if cfg.mm_cfg is None:
            cfg = replace(cfg, mm_cfg=MMConfig())
        self.config = cfg
        mm = cfg.mm_cfg
        enc = mm.vision_encoder
        if not 0 <= enc.class_token_length <= cfg.vision.class_token_length:
            raise ValueError(
                f"model.mm_cfg.vision_encoder.class_token_length={enc.class_token_length}: the vision tower has "
                f"{cfg.vision.class_token_length} class token(s) (model.vision.class_token_length)"
            )
        self.drop_tokens = enc.class_token_length
        self.vision_tower = VisionEncoder(VisionTransformer(cfg.vision), enc.vision_select_layer, False)
        self.projector = build_projector(mm.mm_mlp_adapter_type, self.vision_tower.hidden_size, cfg.llm.hidden_size)
        self.llm = LlamaDecoder(cfg.llm)
        self.im_start = self.im_end = None
        if mm.use_im_start_end:
            self.im_start = nn.Parameter(torch.empty(cfg.llm.hidden_size))
            self.im_end = nn.Parameter(torch.empty(cfg.llm.hidden_size))
        self.reset_adapter()
        self.frozen: tuple[str, ...] = ()
        freeze(self)

    # -- set-up ---------------------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """LLM positions one image takes: patches (+ class tokens kept) (+ start and end)."""
        tokens = self.vision_tower.num_patches + self.vision_tower.tower.num_prefix_tokens - self.drop_tokens
        return tokens + (2 if self.im_start is not None else 0)

    def reset_adapter(self) -> None:
        """Fresh projector (PyTorch's Linear init, as LLaVA) and start/end embeddings (the LLM's embedding init)."""
        for module in self.projector:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        for p in (self.im_start, self.im_end):
            if p is not None:
                nn.init.normal_(p, std=INIT_STD)

    def init_weights(self) -> None:
        self.vision_tower.tower.init_weights()
        self.llm.init_weights()
        self.reset_adapter()

    def train(self, mode: bool = True) -> NevaModel:
        """Train/eval mode; frozen parts stay in eval mode (no dropout or drop path in what does not learn)."""
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def new_kv_cache(self, max_length: int) -> KVCache:
        return self.llm.new_kv_cache(max_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision_tower.set_grad_checkpointing(enable)
        self.llm.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = {f"vision_tower.{n}" for n in self.vision_tower.no_weight_decay()}
        names |= {f"llm.{n}" for n in self.llm.no_weight_decay()}
        return names | ({"im_start", "im_end"} if self.im_start is not None else set())

    # -- images ---------------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, llm hidden]: what replaces each placeholder."""
        if images.ndim != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        # A frozen tower needs no activations kept for backward: nothing upstream of it learns.
        frozen = "vision_tower" in self.frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            pixels = images.to(self.vision_tower.tower.patch_embed.proj.weight.dtype)
            features = self.vision_tower(pixels)[:, self.drop_tokens :]
        x = self.projector(features)
        if self.im_start is not None:
            n, _, d = x.shape
            x = torch.cat([self.im_start.to(x.dtype).expand(n, 1, d), x, self.im_end.to(x.dtype).expand(n, 1, d)], 1)
        return x

    def _features_per_sample(
        self, images: torch.Tensor | Sequence[torch.Tensor | None] | None, counts: list[int]
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """(each sample's image features in placeholder order, features of images no placeholder asked for)."""
        batch, total = len(counts), sum(counts)
        if images is None:
            if total:
                raise ValueError(f"input_ids hold {total} <image> placeholders (IMAGE_TOKEN_INDEX) but no images")
            return [[] for _ in counts], []
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[0] != batch:
                raise ValueError(
                    f"images has shape {tuple(images.shape)}: expected [batch={batch}, 3, H, W] (one per sample), or a "
                    "list of per-sample [n_i, 3, H, W] stacks"
                )
            several = [(i, c) for i, c in enumerate(counts) if c > 1]
            if several:
                i, c = several[0]
                raise ValueError(
                    f"sample {i} has {c} <image> placeholders but images [batch, 3, H, W] holds one image per sample; "
                    "pass a list of per-sample [n_i, 3, H, W] stacks for several"
                )
            # Every row is encoded, used or not (a text-only sample carries a dummy image): each rank then runs the
            # same modules, as DDP/FSDP need.
            feats = self.encode_images(images)
            used = [[feats[i]] if c else [] for i, c in enumerate(counts)]
            return used, [feats[i] for i, c in enumerate(counts) if not c]
        if len(images) != batch:
            raise ValueError(f"images is a list of {len(images)} stacks for a batch of {batch} samples")
        sizes = [0 if x is None else int(x.shape[0]) for x in images]
        for i, (n, c) in enumerate(zip(sizes, counts)):
            if n != c:
                raise ValueError(f"sample {i} has {c} <image> placeholders but {n} images")
        stacks = [x for x in images if x is not None and x.shape[0]]
        feats = list(self.encode_images(torch.cat(stacks)).unbind(0)) if stacks else []
        out, start = [], 0
        for n in sizes:
            out.append(feats[start : start + n])
            start += n
        return out, []

    # -- splicing -------------------------------------------------------------------------------------------------
    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        padding_side: str = "right",
    ) -> SplicedInputs:
        """Replace each placeholder by its image's features and re-pad the batch.

        Args:
            input_ids: [B, T] token ids with IMAGE_TOKEN_INDEX where each image goes, padded on either side.
            images: [B, 3, H, W], image b for sample b's placeholder (samples without one ignore theirs); or a list
                of B stacks [n_b, 3, H, W] for n_b placeholders each (several images per sample).
            attention_mask: [B, T], 1 for real tokens; padding is dropped before splicing. None: no padding.
            labels: [B, T] next-token targets (IGNORE_INDEX where unsupervised), spliced alongside.
            padding_side: ``right`` for training (the LLM then needs no mask), ``left`` for generation (every row's
                next token in the last column).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} is not left or right")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; input_ids has {tuple(input_ids.shape)}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        counts = ((input_ids == IMAGE_TOKEN_INDEX) & real).sum(1).tolist()
        per_sample, unused = self._features_per_sample(images, counts)
        embeds = self.llm.embed(input_ids.clamp(min=0))  # placeholders look up id 0; they are replaced below

        rows = []
        for b in range(input_ids.shape[0]):
            keep = real[b].nonzero().squeeze(1)
            ids, emb = input_ids[b, keep], embeds[b, keep]
            lab = labels[b, keep] if labels is not None else None
            spots = (ids == IMAGE_TOKEN_INDEX).nonzero().squeeze(1).tolist()
            e_parts, i_parts, l_parts, start = [], [], [], 0
            for spot, feats in zip(spots, per_sample[b]):
                n = feats.shape[0]
                e_parts += [emb[start:spot], feats.to(emb.dtype)]
                i_parts += [ids[start:spot], ids.new_full((n,), IMAGE_TOKEN_INDEX)]
                if lab is not None:
                    l_parts += [lab[start:spot], lab.new_full((n,), IGNORE_INDEX)]
                start = spot + 1
            e_parts.append(emb[start:])
            i_parts.append(ids[start:])
            if lab is not None:
                l_parts.append(lab[start:])
            rows.append((torch.cat(e_parts), torch.cat(i_parts), torch.cat(l_parts) if lab is not None else None))

        batch, length = len(rows), max(len(r[0]) for r in rows)
        pad_id = self.config.llm.pad_token_id if self.config.llm.pad_token_id is not None else 0
        out_embeds = embeds.new_zeros(batch, length, embeds.shape[-1])
        out_mask = input_ids.new_zeros(batch, length)
        out_ids = input_ids.new_full((batch, length), pad_id)
        out_labels = input_ids.new_full((batch, length), IGNORE_INDEX) if labels is not None else None
        for b, (e, i, lab) in enumerate(rows):
            span = slice(length - len(e), length) if padding_side == "left" else slice(0, len(e))
            out_embeds[b, span] = e
            out_mask[b, span] = 1
            out_ids[b, span] = i
            if lab is not None:
                out_labels[b, span] = lab
        if unused:
            # Keep the projector in the graph when no sample used its image (DDP/FSDP expect every gradient).
            out_embeds = out_embeds + 0.0 * sum(f.sum() for f in unused).to(out_embeds.dtype)
        positions = (out_mask.cumsum(-1) - 1).clamp(min=0)
        return SplicedInputs(out_embeds, out_mask, positions, out_labels, out_ids)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits [B, L, vocab] over the spliced sequence; with ``labels``, a dict instead.

        Training: ``model(input_ids, images, attention_mask, labels)`` splices (see :meth:`prepare_inputs_embeds`,
        right padding) and returns ``dict(logits, loss, labels, attention_mask, num_tokens)``: the mean next-token
        cross-entropy over the ``num_tokens`` supervised positions, the spliced labels and mask.

        Generation (:func:`vlkit.models.generate.generate`, :meth:`generate`): ``inputs_embeds`` from
        :meth:`prepare_inputs_embeds` with left padding, then text ``input_ids`` with a ``kv_cache``; both go straight
        to the LLM (``attention_mask`` then covers cached + new positions).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids [B, T] (with images) or inputs_embeds [B, T, hidden]")
            if images is None and labels is None:
                if bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                    raise ValueError("input_ids hold <image> placeholders (IMAGE_TOKEN_INDEX) but no images")
                return self.llm(input_ids, None, attention_mask, position_ids, kv_cache, logits_to_keep)
            if kv_cache is not None:
                raise ValueError(
                    "cached generation with images: splice first (prepare_inputs_embeds(..., padding_side='left')) "
                    "or use NevaModel.generate"
                )
            spliced = self.prepare_inputs_embeds(input_ids, images, attention_mask, labels)
            # Right padding: causality already hides the padding from every real position, so no mask (and SDPA's
            # fastest kernels); positions count from 0 in every row either way.
            logits = self.llm(inputs_embeds=spliced.inputs_embeds, logits_to_keep=logits_to_keep)
            labels, attention_mask = spliced.labels, spliced.attention_mask
        else:
            logits = self.llm(None, inputs_embeds, attention_mask, position_ids, kv_cache, logits_to_keep)
        if labels is None:
            return logits
        if logits_to_keep:
            raise ValueError("labels need the logits of every position (logits_to_keep=0)")
        loss, num_tokens = next_token_loss(logits, labels)
        return {"logits": logits, "loss": loss, "labels": labels, "attention_mask": attention_mask,
                "num_tokens": num_tokens}  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GenerateOutput:
        """Continue prompts (placeholders where the images go; any padding) with
        :func:`vlkit.models.generate.generate`; ``kwargs`` are its settings (``max_new_tokens``, ``do_sample``, ...).
        Call ``model.eval()`` first for dropout-free generation."""
        s = self.prepare_inputs_embeds(input_ids, images, attention_mask, padding_side="left")
        return generate(self, s.input_ids, inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, **kwargs)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of position t's logits against labels[t + 1] over supervised targets, their count).

    Only the supervised rows of the logits are cast to float32 (not the whole [B, L, vocab] tensor). Without any
    supervised target the loss is 0 (still part of the graph), not NaN."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    picked = logits[:, :-1][valid].float()
    count = valid.sum()
    loss = F.cross_entropy(picked, targets[valid], reduction="sum") / count.clamp(min=1)
    return loss, count


# -- freezing and stage-1 checkpoints ----------------------------------------------------------------------------------
def freeze(model: NevaModel, mm_cfg: MMConfig | None = None) -> tuple[str, ...]:
    """Freeze what ``mm_cfg`` (default: the model's own) says and unfreeze the rest; returns the frozen parts.

    A frozen part (``vision_tower``, ``llm``) gets ``requires_grad=False`` and eval mode, which
    :meth:`NevaModel.train` keeps; the frozen vision tower also runs without autograd. The projector and the
    start/end embeddings always train. The optimizer must be built after this (it takes trainable parameters only).
    """
    mm = mm_cfg or model.config.mm_cfg
    wanted = {"vision_tower": mm.vision_encoder.freeze, "llm": mm.llm.freeze}
    for name in FREEZABLE:
        getattr(model, name).requires_grad_(not wanted[name])
    model.frozen = tuple(name for name in FREEZABLE if wanted[name])
    model.train(model.training)
    return model.frozen


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (``requires_grad``), detached: what a stage-1 checkpoint holds (projector, and
    start/end embeddings when used), or projector + LLM in stage 2. torch.compile's ``_orig_mod.`` prefixes are
    dropped, so compiled and eager models share checkpoints."""
    return {name.replace("_orig_mod.", ""): p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str = "state") -> list[str]:
    """Load a partial state dict (:func:`trainable_state_dict` of a stage-1 run) over a model whose other weights
    come from elsewhere (the pretrained towers). Every tensor must name a parameter of ``model`` with its shape;
    returns the names loaded.

    Raises:
        ValueError: unknown names or wrong shapes, all listed, naming ``where``.
    """
    params = dict(model.named_parameters())
    unknown = sorted(k for k in state if k not in params)
    wrong = [
        f"{k}: {tuple(t.shape)} (model: {tuple(params[k].shape)})"
        for k, t in state.items()
        if k in params and tuple(t.shape) != tuple(params[k].shape)
    ]
    if unknown or wrong:
        raise ValueError(
            f"{where}: does not fit the model: "
            + "; ".join(
                ([f"unknown tensors {unknown[:6]}" + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")]
                 if unknown else [])
                + ([f"shapes {', '.join(wrong[:6])}"] if wrong else [])
            )
        )  # fmt: skip
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    return sorted(state)
