"""Parameter and FLOP counts of the model at hand, measured by tracing rather than by formula.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so even a 5B-parameter model is
counted in a second without allocating weights. A multiply-add counts as two FLOPs (the counter's convention,
and the one the peers' MFU numbers in BENCHMARKS.md use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass
class FlopCount:
    forward: int
    forward_backward: int


def _measure(fn) -> FlopCount:
    with FlopCounterMode(display=False) as fc:
        out = fn()
    fwd = fc.get_total_flops()
    if not out.requires_grad:  # nothing to train on this path (a frozen tower fed by no trainable input)
        return FlopCount(fwd, fwd)
    with FlopCounterMode(display=False) as fc:
        out = fn()
        out.float().sum().backward()
    return FlopCount(fwd, fc.get_total_flops())


def tower_flops(model: nn.Module, text_length: int | None = None) -> dict[str, FlopCount]:
    """FLOPs for one sample through each tower of a vlkit model, traced on the meta device.

    Keys: ``image`` (CLIP image tower or classifier) and ``text`` (CLIP text tower at ``text_length`` tokens,
    the full context length by default); ``llm`` for a language model (``model.arch=llama``: one sequence of
    ``text_length`` tokens, the context length by default); NeVA: ``image`` (one image through the vision tower and
    projector) and ``llm``. Backward is counted only where something requires grad (frozen parts run forward only,
    or backward for their inputs' gradients). Attention is counted in full, causal or not (the
    convention of PaLM's and Megatron's MFU formulas).
    The model must live on the meta device or be cheap enough to run once at batch size 1.
    """
    cfg = model.config
    device = next(model.parameters()).device
    if cfg.arch == "llama":
        ids = torch.zeros(1, text_length or cfg.llm.encoder_seq_length, dtype=torch.long, device=device)
        return {"llm": _measure(lambda: model(ids))}
    vision = cfg.vision
    pixels = torch.zeros(1, vision.num_channels, vision.img_h, vision.img_w, device=device)
    if cfg.arch == "neva":
        # image: vision tower (as far as it runs) + projector; llm: a sequence fed as embeddings that carry
        # gradients, as the spliced image features do, so backward runs through a frozen LLM too.
        length = text_length or cfg.llm.encoder_seq_length
        embeds = torch.zeros(1, length, cfg.llm.hidden_size, device=device, requires_grad=True)
        return {
            "image": _measure(lambda: model.encode_images(pixels)),
            "llm": _measure(lambda: model.llm(inputs_embeds=embeds)),
        }
    counts = {}
    if hasattr(model, "encode_image"):
        counts["image"] = _measure(lambda: model.encode_image(pixels))
        ids = torch.zeros(1, text_length or cfg.text.encoder_seq_length, dtype=torch.long, device=device)
        counts["text"] = _measure(lambda: model.encode_text(ids))
    else:
        counts["image"] = _measure(lambda: model(pixels))
    return counts
