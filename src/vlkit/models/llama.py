"""LLaMA-architecture language model: the standalone ``model.arch=llama`` and NeVA's LLM.

token ids (or ready-made embeddings) -> pre-norm blocks (RMSNorm, rotary grouped-query attention without biases,
SwiGLU) -> final RMSNorm -> LM head, optionally tied to the token embedding.

Positions come from the attention mask when there is one, so a left-padded batch gives every row positions 0, 1, ...
from its first real token, exactly as when the row runs alone. A :class:`vlkit.nn.KVCache` makes a call extend the
cached positions (incremental decoding, see :mod:`vlkit.models.generate`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlkit.config.schema import LLMConfig, ModelConfig
from vlkit.models.vit import build_transformer
from vlkit.nn import KVCache, RotaryEmbedding, SwiGLU, make_norm

INIT_STD = 0.02  # Megatron's init_method_std and Hugging Face's initializer_range for LLaMA


def position_ids_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last ``new_tokens`` columns of a [B, K] validity mask: real tokens count 0, 1, ... per row;
    padding gets 0 (it is masked anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, -new_tokens:].clamp(min=0)


class LlamaDecoder(nn.Module):
    """The decoder: ``embed`` -> ``transformer`` (blocks) -> ``norm`` -> ``lm_head``. Reads only an :class:`LLMConfig`.

    It has ``.config`` and ``.transformer``, so vlkit.parallel finds it as a tower (tensor parallel, activation
    checkpointing, compile and FSDP apply to its blocks like to a ViT's).
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        width = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, width)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
        self.transformer = build_transformer(cfg, num_kv_heads=cfg.num_query_groups)
        self.norm = make_norm(cfg.normalization, width, cfg.layernorm_epsilon)
        self.lm_head = nn.Linear(width, cfg.vocab_size, bias=False)
        if cfg.share_embeddings_and_output_weights:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Megatron's GPT scheme: N(0, 0.02) everywhere, output projections of each block shrunk by sqrt(2 * layers)
        so the residual stream does not grow with depth; biases zero, norms one."""
        out_std = INIT_STD / math.sqrt(2 * len(self.transformer.blocks))
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        if self.lm_head.weight is not self.embed.weight:
            nn.init.normal_(self.lm_head.weight, std=INIT_STD)
        for block in self.transformer.blocks:
            mlp = block.mlp
            inner = [mlp.gate, mlp.up] if isinstance(mlp, SwiGLU) else [mlp.fc1]
            outer = [block.attn.proj, mlp.down if isinstance(mlp, SwiGLU) else mlp.fc2]
            for lin in [block.attn.qkv, *inner, *outer]:
                nn.init.normal_(lin.weight, std=out_std if lin in outer else INIT_STD)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.norm.reset_parameters()

    def new_kv_cache(self, max_length: int) -> KVCache:
        """An empty cache for up to ``max_length`` positions (prompt + generated tokens)."""
        return KVCache(len(self.transformer.blocks), max_length)

    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]. See :meth:`forward` for the arguments."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] or inputs_embeds [B, T, hidden]")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, cached + new] = "
                    f"[{b}, {past + t}]"
                )
            attention_mask = attention_mask.to(torch.bool)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, t)
            else:
                position_ids = torch.arange(past, past + t, device=x.device).expand(b, t)
        rope = self.rope.at(position_ids, dtype=x.dtype)
        x = self.transformer(x, key_padding_mask=attention_mask, is_causal=True, rope=rope, kv_cache=kv_cache)
        return self.norm(x)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Next-token logits [B, T, vocab] (the last ``logits_to_keep`` positions only when it is > 0).

        Args:
            input_ids: token ids [B, T]; or
            inputs_embeds: embeddings [B, T, hidden] instead (NeVA splices image features into them).
            attention_mask: [B, K] with 1/True for real tokens over every position the queries may see: K = T, or
                cached + T with a KV cache. Needed for left padding. Right padding needs none (causality already
                hides it from real tokens); leaving it out keeps SDPA's fastest kernels.
            position_ids: [B, T]; by default counted from the mask (0 at each row's first real token), else from
                the cache length.
            kv_cache: earlier positions' keys and values; this call appends its own.
            logits_to_keep: with generation, only the last position's logits are needed (1).
        """
        hidden = self.forward_features(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.forward_head(hidden)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()  # norms' gains are 1-D and never decayed by the optimizer; embeddings are, as Megatron does


class LlamaForCausalLM(nn.Module):
    """``model.arch=llama``: a standalone language model built from ``model.llm``. Its decoder sits under ``llm``, as
    in NeVA, so the same weights load into either."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.llm is None:
            raise ValueError("model.arch=llama needs a model.llm section")
        self.config = cfg
        self.llm = LlamaDecoder(cfg.llm)

    def init_weights(self) -> None:
        self.llm.init_weights()

    def new_kv_cache(self, max_length: int) -> KVCache:
        return self.llm.new_kv_cache(max_length)

    def forward_features(self, *args, **kwargs) -> torch.Tensor:
        return self.llm.forward_features(*args, **kwargs)

    def forward_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.forward_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]; the arguments are :meth:`LlamaDecoder.forward`'s."""
        return self.llm(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache, logits_to_keep)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.llm.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"llm.{n}" for n in self.llm.no_weight_decay()}
