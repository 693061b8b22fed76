"""CLIP text tower: token + position embeddings -> causal blocks -> final norm -> pool (end-of-text) -> projection."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.config.schema import TextConfig
from vlkit.models.vit import build_transformer
from vlkit.nn import make_norm


class TextTransformer(nn.Module):
    """Encodes token ids [B, T] (T <= context length) into [B, output_dim].

    Pooling ``eot`` takes the first end-of-text token of each row (OpenAI CLIP and every public checkpoint);
    ``first`` takes position 0. With ``causal`` (the default) tokens after end-of-text cannot influence it, so
    padding needs no mask; a bidirectional tower masks everything after end-of-text instead.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        width = cfg.hidden_size
        self.context_length = cfg.encoder_seq_length
        self.token_embed = nn.Embedding(cfg.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.encoder_seq_length, width))
        self.transformer = build_transformer(cfg)
        self.norm = make_norm(cfg.normalization, width, cfg.layernorm_epsilon)
        self.proj = nn.Linear(width, cfg.output_dim, bias=False) if cfg.output_dim else None
        self.init_weights()

    def init_weights(self) -> None:
        width = self.config.hidden_size
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.transformer.init_weights()
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=width**-0.5)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return eot_positions(ids, self.config.eot_token_id, self.config.pad_token_id)

    def trim_padding(self, ids: torch.Tensor) -> torch.Tensor:
        """Drop the columns after the last end-of-text of the batch. Exact: with a causal mask nothing reads them,
        and a bidirectional tower masks them anyway. CLIP captions are short, so this skips most of the 77 positions."""
        if torch.compiler.is_compiling() or ids.is_meta or ids.shape[1] == 0:
            return ids
        return ids[:, : int(self.eot_positions(ids).max()) + 1]

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """All token states after the final norm: [B, T, width]."""
        t = ids.shape[1]
        if t > self.context_length:
            raise ValueError(f"text of {t} tokens exceeds the context length {self.context_length}")
        x = self.token_embed(ids) + self.pos_embed[:t].to(self.token_embed.weight.dtype)
        mask = None
        if not self.config.causal:
            positions = torch.arange(t, device=ids.device)
            mask = positions[None, :] <= self.eot_positions(ids)[:, None]
        x = self.transformer(x, key_padding_mask=mask, is_causal=self.config.causal)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "first":
            return tokens[:, 0]
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_positions(ids)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context_length:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the context length {self.context_length}")
        ids = self.trim_padding(ids)
        pooled = self.pool(self.forward_features(ids), ids)
        return self.proj(pooled) if self.proj is not None else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()  # open_clip decays the text embeddings; only 1-D parameters are exempt (by the optimizer)


def eot_positions(ids: torch.Tensor, eot_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token per row; rows without one use their last non-pad token."""
    is_eot = ids == eot_token_id
    has_eot = is_eot.any(dim=1)
    first_eot = is_eot.int().argmax(dim=1)
    non_pad = (ids != pad_token_id).int()
    last_real = (non_pad * torch.arange(1, ids.shape[1] + 1, device=ids.device)).argmax(dim=1)
    return torch.where(has_eot, first_eot, last_real)
