"""Vision Transformer: the image tower of CLIP and NeVA and the backbone of ViT classifiers.

patches -> [class tokens | patch tokens] + position embeddings -> (ln_pre) -> blocks -> final norm -> pool -> (proj)
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.config.schema import TransformerConfig, VisionConfig
from vlkit.nn import LayerNorm, PatchDropout, PatchEmbed, Transformer, make_norm, resample_pos_embed


def build_transformer(cfg: TransformerConfig, **extra) -> Transformer:
    """The block stack of a tower, from the fields every tower config shares."""
    return Transformer(
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.ffn_size,
        drop_path_rate=cfg.drop_path_rate,
        activation=cfg.activation,
        normalization=cfg.normalization,
        eps=cfg.layernorm_epsilon,
        bias=cfg.bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        **extra,
    )


class VisionTransformer(nn.Module):
    """ViT with any number of class tokens (0..N), non-square images, optional projection to ``output_dim``.

    Position embeddings are stored for the configured grid; loading a state dict made for another grid resamples
    them (bicubic), so a 224-px checkpoint loads into a 512-px model.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        width = cfg.hidden_size
        self.num_prefix_tokens = cfg.class_token_length
        self.grid_size = cfg.grid_size
        self.patch_embed = PatchEmbed(cfg.patch_dim, cfg.num_channels, width, bias=cfg.patch_bias)
        self.class_token = (
            nn.Parameter(torch.zeros(1, cfg.class_token_length, width)) if cfg.class_token_length else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(cfg.class_token_length + cfg.num_patches, width))
        self.patch_drop = PatchDropout(cfg.drop_patch_rate, cfg.class_token_length)
        self.norm_pre = LayerNorm(width, eps=cfg.layernorm_epsilon) if cfg.pre_norm else nn.Identity()
        self.transformer = build_transformer(cfg)
        self.norm = make_norm(cfg.normalization, width, cfg.layernorm_epsilon)
        self.proj = nn.Linear(width, cfg.output_dim, bias=False) if cfg.output_dim else None
        self._register_load_state_dict_pre_hook(self._resample_pos_embed_on_load)
        self.init_weights()

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def init_weights(self) -> None:
        """OpenAI CLIP's scheme: embeddings ~ N(0, w^-1/2), projections scaled by depth (see ``init_block``)."""
        scale = self.width**-0.5
        nn.init.normal_(self.pos_embed, std=scale)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=scale)
        nn.init.normal_(self.patch_embed.proj.weight, std=scale)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        self.transformer.init_weights()
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=scale)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        grid = (pixels.shape[-2] // self.config.patch_dim, pixels.shape[-1] // self.config.patch_dim)
        pos = self.pos_embed
        if grid != tuple(self.grid_size):
            # Another resolution at run time (e.g. evaluation at a higher size): resample on the fly.
            pos = resample_pos_embed(pos, grid, self.num_prefix_tokens, tuple(self.grid_size))
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + pos.to(x.dtype)
        return self.norm_pre(self.patch_drop(x))

    def forward_intermediates(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final normed tokens [B, T, W], every block's output [B, T, W] before the final norm).

        ``intermediates[-2]`` is the penultimate layer NeVA/LLaVA feed to the language model.
        """
        x, states = self.transformer(self.embed(pixels), return_intermediates=True)
        return self.norm(x), states

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, prefix + patches, W]."""
        return self.norm(self.transformer(self.embed(pixels)))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.global_average_pool:
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(tokens)
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, output_dim] (or [B, width] without projection)."""
        return self.forward_head(self.forward_features(pixels))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "class_token"}

    def _resample_pos_embed_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "pos_embed"
        old = state_dict.get(key)
        if old is None or old.shape == self.pos_embed.shape:
            return
        n_prefix = self.num_prefix_tokens
        if old.ndim == 3:  # some checkpoints keep a leading batch dimension
            old = old[0]
        n_old = old.shape[0] - n_prefix
        old_grid = _guess_grid(n_old, tuple(self.grid_size))
        state_dict[key] = resample_pos_embed(old, tuple(self.grid_size), n_prefix, old_grid)


def _guess_grid(n: int, new_grid: tuple[int, int]) -> tuple[int, int]:
    """The old grid of n positions, assuming it had the new grid's aspect ratio (square when that is square)."""
    aspect = new_grid[1] / new_grid[0]
    gh = round((n / aspect) ** 0.5)
    for h in (gh, gh - 1, gh + 1):
        if h > 0 and n % h == 0 and abs(n // h / h - aspect) < 0.5:
            return h, n // h
    raise ValueError(f"cannot map {n} stored position embeddings onto a grid with aspect {new_grid}")
