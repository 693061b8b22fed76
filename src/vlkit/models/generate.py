"""Batched text generation with a KV cache: greedy or sampled, for vlkit's llama and any model with its interface.

The model is called as ``model(input_ids=... | inputs_embeds=..., attention_mask=..., kv_cache=..., logits_to_keep=1)``
and must offer ``new_kv_cache(max_length)`` (:class:`vlkit.models.llama.LlamaForCausalLM` does; NeVA delegates to its
LLM). The prompt is processed once, then one token per step reads the cache.

Logit processing follows Hugging Face ``generate()``: repetition penalty, then temperature, top-k and top-p (the last
three only when sampling). One difference: the repetition penalty only counts real tokens, never the left padding
(Hugging Face penalises the pad id too, so a padded row would be treated differently from the same row alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlkit.config.schema import LLMConfig, ModelConfig


@dataclass
class GenerateOutput:
    """``tokens`` [B, N]: new tokens, each row ``pad_token_id`` after its ``lengths[b]`` valid ones (the eos or the
    token completing a stop string included); ``finish_reasons[b]`` is ``eos``, ``stop`` or ``length``."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    finish_reasons: list[str]

    def rows(self) -> list[list[int]]:
        """The valid new tokens of each row."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, T], attention_mask [B, T]) padded on the left, as batched generation needs
    (every row's next token then sits in the last column)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one sequence and no empty ones")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` cut before the first occurrence of any stop string."""
    cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------------ logit processing
def apply_repetition_penalty(
    logits: torch.Tensor, tokens: torch.Tensor, penalty: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Hugging Face's (CTRL's) penalty: every token id present in ``tokens`` [B, L] (where ``valid``) has its logit
    divided by ``penalty`` if positive, multiplied if negative; once per id, however often it occurred. Ids outside
    the vocabulary (NeVA's image placeholders) are skipped."""
    if penalty == 1.0 or tokens.shape[1] == 0:
        return logits
    keep = (tokens >= 0) & (tokens < logits.shape[-1])
    if valid is not None:
        keep &= valid
    seen = torch.zeros_like(logits).scatter_add_(1, tokens.clamp(0, logits.shape[-1] - 1), keep.to(logits.dtype)) > 0
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (ties with the k-th kept too), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``p`` (at least one), -inf
    elsewhere. A token stays iff the probability of the tokens ranked above it is below ``p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    history: torch.Tensor,
    history_valid: torch.Tensor | None,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
) -> torch.Tensor:
    """The next-token scores of one step, in Hugging Face's order (penalty, then the sampling warpers)."""
    logits = apply_repetition_penalty(logits, history, repetition_penalty, history_valid)
    if do_sample:
        if temperature != 1.0:
            logits = logits / temperature
        logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return logits


def _check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, penalty: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use do_sample=False for greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty} must be > 0")


def _default_eos(model: nn.Module) -> list[int]:
    cfg = getattr(model, "config", None)
    llm = cfg.llm if isinstance(cfg, ModelConfig) else cfg
    return list(llm.eos_token_ids) if isinstance(llm, LLMConfig) else []


# ------------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    seed: int | None = None,
) -> GenerateOutput:
    """Continue a (left-padded) batch of prompts by up to ``max_new_tokens`` tokens each.

    Args:
        model: see the module docstring. Its train/eval mode is left as it is (call ``model.eval()`` for dropout-free
            generation), as Hugging Face does.
        input_ids: prompts [B, P], left-padded (see :func:`left_pad`); or
        inputs_embeds: prompt embeddings [B, P, hidden] (NeVA's spliced images). ``input_ids`` may come along for
            the repetition penalty only (placeholder ids outside the vocabulary are skipped).
        attention_mask: [B, P], 1 for real tokens; None when nothing is padded.
        do_sample: sample from the processed distribution; greedy (argmax) otherwise.
        temperature, top_k, top_p: sampling warpers (1.0 / 0 / 1.0 disable them). Unlike Hugging Face there is no
            hidden top_k=50 default.
        repetition_penalty: > 1 discourages tokens already in the prompt or generated (greedy too, as Hugging Face).
        eos_token_ids: a row ends at any of these; default: the model config's ``eos_token_ids``.
        pad_token_id: filler after a row ends; default: the first eos id (0 without one).
        stop_strings: a row also ends once ``decode(its new tokens)`` contains one of these (needs ``decode``).
        seed: seeds a private generator, so sampling repeats exactly whatever else used the global RNG.
    """
    _check_settings(max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode callback (token ids -> text)")
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    if prompt is None:
        raise ValueError("pass input_ids [B, P] or inputs_embeds [B, P, hidden]")
    batch, plen, device = prompt.shape[0], prompt.shape[1], prompt.device
    if input_ids is not None and tuple(input_ids.shape[:2]) != (batch, plen):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(prompt.shape)} disagree")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, plen):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, plen)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("a prompt ends in padding: batched generation needs left padding (see left_pad)")
        attention_mask = None if bool(attention_mask.all()) else attention_mask.long()
    eos = list(_default_eos(model) if eos_token_ids is None else eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # The penalty's history: prompt ids (when known) then the generated tokens, with their validity.
    if input_ids is None:
        history = torch.zeros(batch, 0, dtype=torch.long, device=device)
        valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
    else:
        history = input_ids
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    reasons = ["length"] * batch
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)

    cache = model.new_kv_cache(plen + max_new_tokens)
    kwargs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    logits = model(**kwargs, attention_mask=attention_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
    steps = 0
    for step in range(max_new_tokens):
        scores = process_logits(
            logits.float(),
            history,
            valid,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        if do_sample:
            nxt = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        active = ~done
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad))
        tokens[:, step] = nxt
        lengths += active.long()
        steps = step + 1
        ended = active & torch.isin(nxt, eos_ids)
        for b in ended.nonzero().flatten().tolist():
            reasons[b] = "eos"
        done |= ended
        if stop_strings:
            for b in (~done).nonzero().flatten().tolist():
                if any(s in decode(tokens[b, : lengths[b]].tolist()) for s in stop_strings):
                    done[b], reasons[b] = True, "stop"
        if bool(done.all()) or steps == max_new_tokens:
            break
        history = torch.cat([history, nxt[:, None]], dim=1)
        valid = torch.cat([valid, active[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, kv_cache=cache, logits_to_keep=1)[:, -1]
    return GenerateOutput(tokens[:, :steps], lengths, reasons)
