"""Building blocks shared by every model: attention, MLPs, norms, RoPE, drop paths, patch/position embeddings."""

from vlkit.nn.attention import Attention, KVCache, build_attn_mask
from vlkit.nn.block import Transformer, TransformerBlock
from vlkit.nn.drop import DropPath, PatchDropout
from vlkit.nn.embed import PatchEmbed, resample_pos_embed
from vlkit.nn.mlp import Mlp, SwiGLU, make_mlp, quick_gelu
from vlkit.nn.norm import LayerNorm, RMSNorm, make_norm
from vlkit.nn.rope import RotaryEmbedding, apply_rope, rope_frequencies

__all__ = [
    "Attention",
    "DropPath",
    "KVCache",
    "LayerNorm",
    "Mlp",
    "PatchDropout",
    "PatchEmbed",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Transformer",
    "TransformerBlock",
    "apply_rope",
    "build_attn_mask",
    "make_mlp",
    "make_norm",
    "quick_gelu",
    "resample_pos_embed",
    "rope_frequencies",
]
