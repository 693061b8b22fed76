"""Known Hugging Face Hub names, offline: their architectures, and where their local copies are looked for.

vlkit never downloads. A Hub name (``openai/clip-vit-large-patch14``) resolves to

* its architecture, from the table below (the public ``config.json`` settings that fix the shapes, read through the
  same converters as a downloaded directory), so ``vlkit info`` and configs show the right shapes and parameter
  counts without the weights;
* its weights, from the first local copy found: the path itself, ``$VLKIT_MODELS/<org>/<name>``, or the Hugging
  Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``: ``models--org--name/snapshots/REV``).
  Missing, the error says where it looked and the one command that downloads them.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from vlkit.utils.errors import UserError

MODELS_ENV = "VLKIT_MODELS"

_OPENAI_PRE = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
               "resample": 3}  # fmt: skip


def _clip(proj: int, text: tuple, vision: tuple, act: str = "quick_gelu") -> dict:
    """A transformers CLIPModel config.json: text (width, ffn, heads, layers), vision (width, ffn, heads, layers,
    patch, image)."""
    tw, tf, th, tl = text
    vw, vf, vh, vl, patch, image = vision
    common = {"hidden_act": act, "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": proj,
        "logit_scale_init_value": 2.6592,
        "text_config": {"hidden_size": tw, "intermediate_size": tf, "num_attention_heads": th, "num_hidden_layers": tl,
                        "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2, **common},
        "vision_config": {"hidden_size": vw, "intermediate_size": vf, "num_attention_heads": vh,
                          "num_hidden_layers": vl, "patch_size": patch, "image_size": image, "num_channels": 3,
                          **common},
    }  # fmt: skip


def _llama(width: int, ffn: int, layers: int, heads: int, vocab: int = 32000, pad: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": pad,
    }


def _llava(text: dict) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": {**HUB["openai/clip-vit-large-patch14-336"]["config"]["vision_config"],
                          "model_type": "clip_vision_model"},
        "text_config": {**text, "vocab_size": 32064},
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_token_index": 32000,
    }  # fmt: skip


# name -> {"kind": clip | llama | llava, "config": the public config.json's shape-fixing settings, "pre": processor}
_L14_TEXT = (768, 3072, 12, 12)
HUB: dict[str, dict] = {
    "openai/clip-vit-base-patch32": {"kind": "clip", "config": _clip(512, (512, 2048, 8, 12),
                                                                     (768, 3072, 12, 12, 32, 224))},
    "openai/clip-vit-base-patch16": {"kind": "clip", "config": _clip(512, (512, 2048, 8, 12),
                                                                     (768, 3072, 12, 12, 16, 224))},
    "openai/clip-vit-large-patch14": {"kind": "clip", "config": _clip(768, _L14_TEXT, (1024, 4096, 16, 24, 14, 224))},
    "openai/clip-vit-large-patch14-336": {"kind": "clip",
                                          "config": _clip(768, _L14_TEXT, (1024, 4096, 16, 24, 14, 336))},
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {"kind": "clip", "config": _clip(1024, (1024, 4096, 16, 24),
                                                                              (1280, 5120, 16, 32, 14, 224), "gelu")},
    "lmsys/vicuna-7b-v1.5": {"kind": "llama", "config": _llama(4096, 11008, 32, 32, pad=0)},
    "meta-llama/Llama-2-7b-chat-hf": {"kind": "llama", "config": _llama(4096, 11008, 32, 32)},
    "meta-llama/Llama-2-13b-chat-hf": {"kind": "llama", "config": _llama(5120, 13824, 40, 40)},
}  # fmt: skip
HUB["llava-hf/llava-1.5-7b-hf"] = {"kind": "llava", "config": _llava(_llama(4096, 11008, 32, 32, pad=32001))}
HUB["llava-hf/llava-1.5-13b-hf"] = {"kind": "llava", "config": _llava(_llama(5120, 13824, 40, 40, pad=32001))}
for _entry in HUB.values():
    if _entry["kind"] in ("clip", "llava"):
        _entry["pre"] = _OPENAI_PRE
_CASEFOLD = {name.lower(): name for name in HUB}


def known_name(value: str) -> str | None:
    """The table's spelling of a Hub name (matched case-insensitively), or None."""
    return _CASEFOLD.get(str(value).strip().lower())


def hub_model_config(name: str) -> dict:
    """The vlkit model config (a plain dict for :func:`vlkit.create_model`) of a known Hub name.

    Raises:
        KeyError: not in the table.
    """
    entry = HUB[known_name(name) or name]
    config, where = entry["config"], f"{name} (vlkit's table of Hub configs)"
    if entry["kind"] == "clip":
        from vlkit.interop.hf import hf_model_config

        return hf_model_config(config, entry.get("pre"), where)
    if entry["kind"] == "llama":
        from vlkit.interop.hf_llama import llm_config_from_hf

        return {"arch": "llama", "llm": asdict(llm_config_from_hf(config, where))}
    from vlkit.interop.hf_llava import neva_config_from_hf

    return asdict(neva_config_from_hf(config, entry.get("pre"), where))


# --------------------------------------------------------------------------------------------------- local copies
class NotDownloadedError(UserError, FileNotFoundError):
    """A pretrained model named by a path or Hub name has no local copy; the message says where vlkit looked and
    how to fetch it (exit 2)."""


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face hub caches to look in, in transformers' order of precedence (deduplicated)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    out: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d not in out:
            out.append(d)
    return out


def _snapshot(cache: Path, name: str) -> Path | None:
    """``models--org--name/snapshots/REV`` in one cache: the revision ``refs/main`` names, else the newest."""
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        rev = snapshots / ref.read_text(encoding="utf-8").strip()
        if rev.is_dir():
            return rev
    revs = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return revs[0] if revs else None


def looks_like_hub_name(value: str) -> bool:
    return str(value).count("/") == 1 and not str(value).startswith((".", "/", "~")) and "\\" not in str(value)


def locate(value: str, key: str, from_hf: bool = False) -> Path:
    """The local copy a ``from_pretrained`` value names: the path itself, or for a Hub name (``from_hf``, a known
    name, or a value shaped like ``org/name``) ``$VLKIT_MODELS/org/name`` or its Hugging Face cache snapshot.

    Raises:
        NotDownloadedError: none exists; one line naming where it looked and the command that downloads it.
    """
    path = Path(value).expanduser()
    if path.exists():
        return path
    looked = [str(path)]
    if from_hf or known_name(value) or looks_like_hub_name(value):
        name = known_name(value) or str(value)
        models = os.environ.get(MODELS_ENV)
        if models:
            candidate = Path(models).expanduser() / name
            if candidate.exists():
                return candidate
            looked.append(str(candidate))
        for cache in hf_cache_dirs():
            snap = _snapshot(cache, name)
            if snap is not None:
                return snap
            looked.append(str(cache / ("models--" + name.replace("/", "--"))))
        target = f"${MODELS_ENV}/{name}" if models else f"DIR (or set {MODELS_ENV} and use ${MODELS_ENV}/{name})"
        raise NotDownloadedError(
            f"{key}={value!r}: no local copy (looked in {', '.join(looked)}); vlkit never downloads: fetch it with "
            f"`huggingface-cli download {name} --local-dir {target}`"
        )
    raise NotDownloadedError(f"{key}={value!r}: no such file or directory")
