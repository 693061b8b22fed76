"""Tiny random transformers CLIP models and a tiny CLIP tokenizer, written to disk the way the Hub lays them out."""

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from vlkit.data.tokenizer import clip_base_vocab

WORDS = ("a", "photo", "of", "cat", "dog", "the", "red", "blue", "circle", "square", "on", "green")
CTX = 24


def tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: the 512 byte symbols, merges spelling out WORDS, then the two special tokens last
    (so end-of-text is the largest id, as in OpenAI's vocabulary)."""
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        if len(word) == 1:
            continue
        current = word[0]
        for piece in [*word[1:-1], word[-1] + "</w>"]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
    vocab: dict[str, int] = {}
    for token in [*clip_base_vocab(), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(directory: Path) -> dict[str, int]:
    """vocab.json + merges.txt of :func:`tiny_bpe` (transformers' CLIPTokenizer files)."""
    vocab, merges = tiny_bpe()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


VOCAB = len(tiny_bpe()[0])
EOT, BOS = VOCAB - 1, VOCAB - 2


def tiny_config(act: str = "quick_gelu", legacy_eos: bool = False, **top) -> CLIPConfig:
    """Small towers with different widths, a projection unlike both, and a non-default eps."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=CTX, hidden_act=act, layer_norm_eps=1e-6, bos_token_id=BOS,
                eos_token_id=2 if legacy_eos else EOT, pad_token_id=1 if legacy_eos else EOT)  # fmt: skip
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act=act, layer_norm_eps=1e-6)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=top.pop("projection_dim", 24), **top)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value: norms start at 1/0 and biases at 0, which would hide a swapped
    norm or mis-ordered q/k/v bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def build_hf(directory: Path, config: CLIPConfig | None = None, tokenizer: bool = True, **save_kwargs) -> CLIPModel:
    """A random CLIPModel saved to ``directory`` with a preprocessor config and (optionally) the tiny tokenizer."""
    torch.manual_seed(0)
    model = perturbed(CLIPModel(config or tiny_config()))
    model.save_pretrained(directory, **save_kwargs)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 2, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
    }  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if tokenizer:
        write_tokenizer(directory)
    return model


def inputs(image_size=(32, 32), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and token ids: rows of [bos, words..., eot, padding] with end-of-text at different places."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, *image_size, generator=g)
    ids = torch.randint(1, VOCAB - 2, (3, CTX), generator=g)
    ids[:, 0] = BOS
    for row, eot in enumerate([3, CTX - 1, 9]):
        ids[row, eot] = EOT
        ids[row, eot + 1 :] = 0
    return pixels, ids
