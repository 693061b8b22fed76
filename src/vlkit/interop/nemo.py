"""NeMo checkpoints (``.nemo``) -> vlkit: our own reader of NeMo's Megatron GPT / LLaMA files (to vlkit's LLaMA) and,
through :mod:`vlkit.interop.nemo_clip`, of its Megatron-core CLIP models.

A ``.nemo`` is a tar (or the directory it extracts to) holding ``model_config.yaml`` and the weights, in one of:

* ``model_weights.ckpt`` (one process), ``mp_rank_XX/model_weights.ckpt`` (tensor-parallel rank XX) or
  ``tp_rank_XX_pp_rank_YYY/model_weights.ckpt`` (tensor- and pipeline-parallel): each a ``torch.save``d state dict
  of that rank's shards, read with ``torch.load(weights_only=True)``;
* ``model_weights/``: a torch.distributed checkpoint (Megatron-core's ``torch_dist`` backend) of the global tensors,
  each block's tensors stacked along a leading layer axis; read in this process after its ``.metadata`` is vetted.

Transformer Engine's ``_extra_state`` entries (FP8 bookkeeping, pickled ``io.BytesIO`` objects) are dropped: their
bytes are never interpreted. Anything that needs more than tensors and plain containers is refused, naming the file.

Megatron's tensor-parallel layout, merged here: column-parallel weights (the fused QKV, ``fc1``, the vocabulary of
the embedding and output layer) are split along rows, row-parallel ones (attention ``proj``, ``fc2``) along
columns; norms are replicated. The fused QKV rows are grouped per query group ``[q heads of g; k_g; v_g]`` and each
rank holds whole groups, which is vlkit's fused layout already. SwiGLU's ``fc1`` holds ``[gate; up]`` per rank, so
merging splits each rank's block in two. Names exist in two generations: Megatron-core (``decoder.layers.N.
self_attention.linear_qkv``; ``mcore_gpt: True``) and NeMo's legacy modules (``language_model.encoder.layers.N.
self_attention.query_key_value``); both map to :class:`vlkit.models.llama.LlamaDecoder`.

The vocabulary stays as stored: NeMo pads it to a multiple of ``make_vocab_size_divisible_by`` x TP, so the model's
``vocab_size`` may exceed the tokenizer's (the padded rows are never targets). The tokenizer (SentencePiece) is not
converted: point ``model.llm.tokenizer`` at a ``tokenizer.json``.
"""

from __future__ import annotations

import json
import pickle
import re
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml
from torch import nn

from vlkit.config.schema import LLMConfig, ModelConfig
from vlkit.interop.files import ModelFormatError
from vlkit.models.factory import create_model

NEMO_CONFIG = "model_config.yaml"
RANK_WEIGHTS = "model_weights.ckpt"
DIST_WEIGHTS = "model_weights"
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")
_EXTRA_STATE = "_extra_state"


# --------------------------------------------------------------------------------------------------- the archive
class NemoArchive:
    """The files of a ``.nemo``: a tar (plain or gzip) or an extracted directory, under normalised relative names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        if self.path.is_dir():
            self.names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
            self._members: dict[str, Any] = {}
            return
        try:
            self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 (closed by close())
            members = [m for m in self._tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            raise ModelFormatError(f"{self.path}: not a .nemo archive (a tar file): {e}") from None
        self._members = {_clean(m.name): m for m in members}
        self.names = sorted(self._members)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def where(self, name: str) -> str:
        return str(self.path / name) if self._tar is None else f"{self.path}:{name}"

    @contextmanager
    def open(self, name: str) -> Iterator[Any]:
        if self._tar is None:
            with open(self.path / name, "rb") as f:
                yield f
        else:
            f = self._tar.extractfile(self._members[name])
            try:
                yield f
            finally:
                f.close()

    @contextmanager
    def directory(self, prefix: str) -> Iterator[Path]:
        """A local directory holding the files under ``prefix/`` (extracted to a temporary one from a tar)."""
        if self._tar is None:
            yield self.path / prefix
            return
        with tempfile.TemporaryDirectory(prefix="vlkit-nemo-") as tmp:
            for name in self.names:
                if name.startswith(prefix + "/"):
                    target = Path(tmp, *PurePosixPath(name).parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with self.open(name) as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
            yield Path(tmp, *PurePosixPath(prefix).parts)


def _clean(name: str) -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "/")]
    if any(p == ".." for p in parts):
        return "\0unsafe"  # never read: no layout names it
    return "/".join(parts)


def is_nemo(path: str | Path) -> bool:
    """A ``.nemo`` tar, or a directory with ``model_config.yaml`` and NeMo weights."""
    path = Path(path)
    if path.is_dir():
        return (path / NEMO_CONFIG).is_file() and (
            (path / RANK_WEIGHTS).is_file()
            or (path / DIST_WEIGHTS).is_dir()
            or any(_RANK_DIR.match(p.name) for p in path.iterdir() if p.is_dir())
        )
    if not path.is_file() or not (path.suffix == ".nemo" or tarfile.is_tarfile(path)):
        return False
    try:
        with tarfile.open(path, "r:*") as tar:
            return any(_clean(m.name) == NEMO_CONFIG for m in tar)
    except (tarfile.TarError, OSError):
        return False


def read_nemo_config(path: str | Path, archive: NemoArchive | None = None) -> dict:
    """``model_config.yaml`` of a ``.nemo`` (YAML, safe-loaded), nothing else read."""
    own = archive is None
    archive = archive or NemoArchive(path)
    try:
        if NEMO_CONFIG not in archive.names:
            raise ModelFormatError(f"{archive.path}: no {NEMO_CONFIG} (holds {archive.names[:8]})")
        with archive.open(NEMO_CONFIG) as f:
            try:
                config = yaml.safe_load(f.read().decode("utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{archive.where(NEMO_CONFIG)}: not valid YAML ({e})") from None
    finally:
        if own:
            archive.close()
    if not isinstance(config, dict):
        raise ModelFormatError(f"{archive.where(NEMO_CONFIG)}: expected a mapping")
    return config


# ------------------------------------------------------------------------------------------------ reading weights
class _Skipped:
    """Stands in for Transformer Engine's pickled ``io.BytesIO`` extra state: constructed, never interpreted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_rank_file(archive: NemoArchive, name: str) -> dict[str, torch.Tensor]:
    where = archive.where(name)
    try:
        with archive.open(name) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals([(_Skipped, "_io.BytesIO")]):
                data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
        raise ModelFormatError(
            f"{where}: refused: torch.load(weights_only=True) cannot read it as plain tensors"
            + (f" ({detail})" if detail else "")
            + "; vlkit never unpickles with full pickle, which could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{where}: not a PyTorch weights file ({first})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFormatError(f"{where}: holds a {type(data).__name__}, not a state dict")
    state = {k: v for k, v in data.items() if not k.endswith(_EXTRA_STATE)}
    others = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ModelFormatError(f"{where}: not a state dict: entries {others[:5]} are not tensors")
    return state


def _read_dist(directory: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensor entries of a Megatron-core ``torch_dist`` checkpoint, as full tensors (``_extra_state`` and other
    non-tensor entries are listed in its metadata but never read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    from vlkit.interop.checkpoint_files import CheckpointError, MetadataUnpickler, _load_in_this_process

    info_file = directory / "metadata.json"
    if info_file.is_file():
        try:
            backend = json.loads(info_file.read_text(encoding="utf-8")).get("sharded_backend")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            backend = None
        if backend not in (None, "torch_dist"):
            raise ModelFormatError(
                f"{where}/metadata.json: sharded_backend={backend!r}; vlkit reads the torch_dist format only "
                "(re-save the checkpoint with NeMo's default dist_ckpt_format: torch_dist)"
            )
    meta_file = directory / ".metadata"
    if not meta_file.is_file():
        raise ModelFormatError(f"{where}: a {DIST_WEIGHTS}/ folder without .metadata (not a torch_dist checkpoint)")
    with open(meta_file, "rb") as f:
        try:
            metadata = MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{where}/.metadata: not a DCP metadata file vlkit will read ({e})") from None
    if not isinstance(metadata, Metadata):
        raise ModelFormatError(f"{where}/.metadata: holds a {type(metadata).__name__}, not DCP metadata")

    class VettedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            return metadata

    state = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and not k.endswith(_EXTRA_STATE)
    }
    try:
        _load_in_this_process(state, VettedReader(str(directory)))
    except CheckpointError as e:
        raise ModelFormatError(f"{where}: {e}") from None
    return state


# ------------------------------------------------------------------------------------------------------- names
# Megatron-core and NeMo's legacy names -> a role; per layer (role, index) or global. Keys are matched after the
# wrappers' prefixes (``model.``, ``module.`` of megatron_amp_O2) are stripped.
_GLOBAL = {
    "embedding.word_embeddings.weight": "embed",
    "language_model.embedding.word_embeddings.weight": "embed",
    "decoder.final_layernorm.weight": "final_norm",
    "language_model.encoder.final_layernorm.weight": "final_norm",
    "output_layer.weight": "output",
    "language_model.output_layer.weight": "output",
    # Legacy NeMo with pipeline stages and tied embeddings: the last stage's copy of the embedding (module.py's
    # word_embeddings), loaded as an untied head equal to it.
    "word_embeddings.weight": "output",
}
# Persistent buffers computed from the config (legacy RotaryEmbedding registers inv_freq): not weights.
_DERIVED = ("rotary_pos_emb.inv_freq",)
_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "norm1",
    "input_layernorm.weight": "norm1",
    "self_attention.linear_qkv.weight": "qkv.weight",
    "self_attention.linear_qkv.bias": "qkv.bias",
    "self_attention.query_key_value.weight": "qkv.weight",
    "self_attention.query_key_value.bias": "qkv.bias",
    "self_attention.linear_proj.weight": "proj.weight",
    "self_attention.linear_proj.bias": "proj.bias",
    "self_attention.dense.weight": "proj.weight",
    "self_attention.dense.bias": "proj.bias",
    "mlp.linear_fc1.layer_norm_weight": "norm2",
    "pre_mlp_layernorm.weight": "norm2",
    "post_attention_layernorm.weight": "norm2",
    "mlp.linear_fc1.weight": "fc1.weight",
    "mlp.linear_fc1.bias": "fc1.bias",
    "mlp.dense_h_to_4h.weight": "fc1.weight",
    "mlp.dense_h_to_4h.bias": "fc1.bias",
    "mlp.dense_h_to_4h_2.weight": "fc1_up.weight",  # legacy non-fused swiglu: dense_h_to_4h is then the gate
    "mlp.dense_h_to_4h_2.bias": "fc1_up.bias",
    "mlp.linear_fc2.weight": "fc2.weight",
    "mlp.linear_fc2.bias": "fc2.bias",
    "mlp.dense_4h_to_h.weight": "fc2.weight",
    "mlp.dense_4h_to_h.bias": "fc2.bias",
}
_LAYER_KEY = re.compile(r"^(?:decoder|language_model\.encoder)\.layers\.(\d+)\.(.+)$")
_STACKED_KEY = re.compile(r"^(.*?(?:decoder|language_model\.encoder))\.layers\.(?!\d)(.+)$")
# Tensor-parallel split axis of each role (None: replicated); fc1 also needs SwiGLU's per-rank [gate; up] split.
_COLUMN = ("embed", "output", "qkv.weight", "qkv.bias", "fc1.weight", "fc1.bias", "fc1_up.weight", "fc1_up.bias")
_ROW = ("proj.weight", "fc2.weight")


def _strip(key: str) -> str:
    for prefix in ("model.", "module."):
        key = key.removeprefix(prefix)
    return key.removeprefix("module.")


def _roles(state: dict[str, torch.Tensor], where: str) -> dict[tuple[str, int], torch.Tensor]:
    """``{(role, layer or -1): tensor}`` for one rank's state dict; unknown names are an error listing them."""
    out, unknown = {}, []
    for key, t in state.items():
        name = _strip(key)
        if name.endswith(_DERIVED):
            continue
        if name in _GLOBAL:
            out[(_GLOBAL[name], -1)] = t
            continue
        m = _LAYER_KEY.match(name)
        if m and m.group(2) in _LAYER:
            out[(_LAYER[m.group(2)], int(m.group(1)))] = t
        else:
            unknown.append(key)
    if unknown:
        raise ModelFormatError(
            f"{where}: tensors of no known Megatron GPT / LLaMA layout: {sorted(unknown)[:8]} (vlkit reads NeMo's "
            "GPT-family language models: Megatron-core and legacy names)"
        )
    return out


def _unstack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron-core's distributed format stacks each block's tensor along a leading layer axis
    (``decoder.layers.mlp.linear_fc1.weight`` [L, ...]): back to one key per layer."""
    out = {}
    for key, t in state.items():
        m = _STACKED_KEY.match(_strip(key))
        if m is None:
            out[key] = t
            continue
        for i in range(t.shape[0]):
            out[f"{m.group(1)}.layers.{i}.{m.group(2)}"] = t[i]
    return out


def _merge_tp(ranks: list[dict[tuple[str, int], torch.Tensor]], where: str) -> dict[tuple[str, int], torch.Tensor]:
    """One state from the tensor-parallel ranks' shards (see the module docstring for the layout)."""
    if len(ranks) == 1:
        return ranks[0]
    keys = set(ranks[0])
    for i, r in enumerate(ranks[1:], 1):
        if set(r) != keys:
            raise ModelFormatError(f"{where}: tensor-parallel rank {i} holds other tensors than rank 0")
    out = {}
    for key in ranks[0]:
        role, parts = key[0], [r[key] for r in ranks]
        fused_swiglu = role in ("fc1.weight", "fc1.bias") and (role.replace("fc1", "fc1_up"), key[1]) not in keys
        if fused_swiglu:  # each rank holds [gate_r; up_r]: all gates first, then all ups
            halves = [p.chunk(2, dim=0) for p in parts]
            out[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        elif role in _COLUMN:
            out[key] = torch.cat(parts, dim=0)
        elif role in _ROW:
            out[key] = torch.cat(parts, dim=1)
        else:
            out[key] = parts[0]
    return out


def _rank_layout(archive: NemoArchive) -> dict[tuple[int, int], str] | None:
    """``{(pp, tp): file}`` of the per-rank weights files, or None."""
    if RANK_WEIGHTS in archive.names:
        return {(0, 0): RANK_WEIGHTS}
    found = {}
    for name in archive.names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == RANK_WEIGHTS and (m := _RANK_DIR.match(parts[0])):
            tp = int(m.group(1) if m.group(1) is not None else m.group(2))
            found[(int(m.group(3) or 0), tp)] = name
    return found or None


def read_raw(archive: NemoArchive) -> tuple[str, Any]:
    """The stored tensors under NeMo's names: ``("ranks", {(pp, tp): (file, state)})`` for per-rank files (loaded
    one rank at a time), or ``("dist", state)`` for a ``model_weights/`` checkpoint (global tensors, layers
    unstacked)."""
    layout = _rank_layout(archive)
    where = str(archive.path)
    if layout is not None:
        pps = sorted({pp for pp, _ in layout})
        tps = sorted({tp for _, tp in layout})
        if pps != list(range(len(pps))) or tps != list(range(len(tps))) or len(layout) != len(pps) * len(tps):
            raise ModelFormatError(f"{where}: incomplete set of rank files: {sorted(layout.values())}")
        return "ranks", {key: (archive.where(name), _load_rank_file(archive, name)) for key, name in layout.items()}
    if any(n.startswith(DIST_WEIGHTS + "/") for n in archive.names):
        with archive.directory(DIST_WEIGHTS) as directory:
            return "dist", _unstack(_read_dist(directory, archive.where(DIST_WEIGHTS)))
    raise ModelFormatError(
        f"{where}: no NeMo weights found: expected {RANK_WEIGHTS}, mp_rank_XX/{RANK_WEIGHTS}, "
        f"tp_rank_XX_pp_rank_YYY/{RANK_WEIGHTS} or a {DIST_WEIGHTS}/ distributed checkpoint; it holds "
        f"{archive.names[:10]}"
    )


def read_nemo_state(archive: NemoArchive, raw: tuple[str, Any] | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """A GPT / LLaMA ``.nemo``'s tensors, merged across ranks, as ``{(role, layer): tensor}``."""
    kind, data = raw or read_raw(archive)
    if kind == "dist":
        return _roles(data, archive.where(DIST_WEIGHTS))
    pps, tps = sorted({pp for pp, _ in data}), sorted({tp for _, tp in data})
    merged: dict[tuple[str, int], torch.Tensor] = {}
    offset = 0
    for pp in pps:
        stage = _merge_tp([_roles(data[(pp, tp)][1], data[(pp, tp)][0]) for tp in tps], str(archive.path))
        layers = sorted({i for _, i in stage if i >= 0})
        for (role, i), t in stage.items():
            if i < 0 and (role, i) in merged:
                continue  # a global tensor that several stages hold (a copy): the first stage's
            merged[(role, i + offset if i >= 0 else i)] = t
        offset += len(layers)
    return merged


# ------------------------------------------------------------------------------------------------------ config
def llm_config_from_nemo(config: dict, vocab_size: int | None = None, where: str = NEMO_CONFIG) -> LLMConfig:
    """vlkit's :class:`LLMConfig` for a NeMo GPT ``model_config.yaml`` (what vlkit cannot represent raises)."""
    try:
        layers, width = int(config["num_layers"]), int(config["hidden_size"])
        ffn, heads = int(config["ffn_hidden_size"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{where}: not a NeMo GPT model config (missing or bad {e})") from None
    checks = {
        "activation": (str(config.get("activation", "gelu")), ("swiglu", "fast-swiglu")),
        "normalization": (str(config.get("normalization", "layernorm")), ("rmsnorm",)),
        "position_embedding_type": (str(config.get("position_embedding_type", "learned_absolute")), ("rope",)),
    }
    for key, (value, ok) in checks.items():
        if value not in ok:
            raise ModelFormatError(f"{where}: {key}={value!r}: vlkit's LLaMA needs {' or '.join(ok)}")
    if float(config.get("rotary_percentage", 1.0)) != 1.0:
        raise ModelFormatError(f"{where}: rotary_percentage={config['rotary_percentage']}: only 1.0 is supported")
    if config.get("openai_gelu"):  # NeMo's activation_to_func lets it replace the SwiGLU gate's SiLU
        raise ModelFormatError(f"{where}: openai_gelu=True: vlkit's LLaMA gates with SiLU")
    if config.get("megatron_legacy") and not config.get("mcore_gpt"):
        # Each rank's fused QKV rows are then [Q; K; V] blocks, not Megatron's per-group interleave.
        raise ModelFormatError(f"{where}: megatron_legacy=True (the old fused QKV order) is not supported")
    kv_channels = config.get("kv_channels")
    if kv_channels and int(kv_channels) * heads != width:
        raise ModelFormatError(f"{where}: kv_channels={kv_channels} with {heads} heads of a {width}-wide model: "
                               "vlkit's LLaMA needs head size = hidden_size / num_attention_heads")  # fmt: skip
    kv = config.get("num_query_groups")
    factor = config.get("seq_len_interpolation_factor")
    seq = config.get("encoder_seq_length") or config.get("max_position_embeddings") or 4096
    return LLMConfig(
        num_layers=layers,
        hidden_size=width,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=int(kv) if kv else None,
        vocab_size=int(vocab_size or config.get("padded_vocab_size") or config.get("vocab_size") or 32000),
        layernorm_epsilon=float(config.get("layernorm_epsilon", 1e-5)),
        encoder_seq_length=int(seq),
        rotary_base=float(config.get("rotary_base", 10000.0)),
        rope_scaling=_rope_scaling(config, factor, where),
        share_embeddings_and_output_weights=bool(config.get("share_embeddings_and_output_weights", True)),
        bias=bool(config.get("bias", True)),
    )


def _rope_scaling(config: dict, interpolation: Any, where: str) -> dict | None:
    """NeMo's rotary scaling: ``scale_positional_embedding`` (Megatron-core models) is LLaMA-3.1's scheme (NeMo's
    apply_rope_scaling: 8 / 1 / 4 / 8192); ``seq_len_interpolation_factor`` divides the positions."""
    if config.get("scale_positional_embedding"):
        if interpolation or not config.get("mcore_gpt"):
            raise ModelFormatError(f"{where}: scale_positional_embedding is read for Megatron-core models without "
                                   "seq_len_interpolation_factor only")  # fmt: skip
        return {"rope_type": "llama3", "factor": float(config.get("scale_factor", 8.0)),
                "low_freq_factor": float(config.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(config.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(config.get("old_context_len", 8192))}  # fmt: skip
    return {"rope_type": "linear", "factor": float(interpolation)} if interpolation else None


def _vlkit_state(roles: dict[tuple[str, int], torch.Tensor], cfg: LLMConfig, where: str) -> dict[str, torch.Tensor]:
    """LlamaDecoder's state dict from the merged roles; every tensor accounted for."""
    left = dict(roles)
    missing: list[str] = []

    def take(role: str, i: int = -1) -> torch.Tensor | None:
        t = left.pop((role, i), None)
        if t is None:
            missing.append(role if i < 0 else f"layer {i} {role}")
        return t

    out = {"embed.weight": take("embed"), "norm.weight": take("final_norm")}
    head = left.pop(("output", -1), None)
    out["lm_head.weight"] = out["embed.weight"] if cfg.share_embeddings_and_output_weights else head
    if head is None and not cfg.share_embeddings_and_output_weights:
        missing.append("output")
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.num_layers):
        b = f"transformer.blocks.{i}"
        out[f"{b}.norm1.weight"] = take("norm1", i)
        out[f"{b}.norm2.weight"] = take("norm2", i)
        for p in params:
            out[f"{b}.attn.qkv.{p}"] = take(f"qkv.{p}", i)  # Megatron's per-group rows are vlkit's fused layout
            out[f"{b}.attn.proj.{p}"] = take(f"proj.{p}", i)
            out[f"{b}.mlp.down.{p}"] = take(f"fc2.{p}", i)
            fc1, up = take(f"fc1.{p}", i), left.pop((f"fc1_up.{p}", i), None)
            if fc1 is not None and up is None:
                fc1, up = fc1.chunk(2, dim=0)  # fused SwiGLU: [gate; up]
            out[f"{b}.mlp.gate.{p}"], out[f"{b}.mlp.up.{p}"] = fc1, up
    if missing or left:
        extra = sorted(f"{r} (layer {i})" if i >= 0 else r for r, i in left)
        raise ModelFormatError(
            f"{where}: weights do not match model_config.yaml ({cfg.num_layers} layers, bias={cfg.bias}, "
            f"tied={cfg.share_embeddings_and_output_weights}): missing {missing[:8]}, unexpected {extra[:8]}"
        )
    return {k: t.contiguous() for k, t in out.items()}


def load_nemo(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A vlkit ``LlamaForCausalLM`` (``model.arch=llama``) from a NeMo GPT / LLaMA ``.nemo`` (file or directory), or
    a vlkit ``CLIPModel`` from a NeMo CLIP one (``vision_encoder.`` / ``text_encoder.`` tensors).

    Raises:
        ModelFormatError: not a ``.nemo``, a layout or architecture vlkit cannot read, or a file it refuses to
            unpickle (the message names the file).
    """
    from vlkit.interop.files import assign_state_dict
    from vlkit.interop.hf_llama import check_shapes

    archive = NemoArchive(path)
    try:
        config = read_nemo_config(path, archive)
        raw = read_raw(archive)
        if _is_clip(raw):
            from vlkit.interop.nemo_clip import load_nemo_clip

            model = load_nemo_clip(config, raw, str(path), device=device)
            return model if dtype is None else model.to(dtype)
        roles = read_nemo_state(archive, raw)
    finally:
        archive.close()
    where = str(path)
    embed = roles.get(("embed", -1))
    if embed is None:
        raise ModelFormatError(f"{where}: no word embeddings found (a pipeline stage or a non-GPT model?)")
    cfg = llm_config_from_nemo(config, embed.shape[0], f"{where}:{NEMO_CONFIG}")
    # What the weights say wins over defaults the config may leave out.
    cfg = _with_weights_facts(cfg, roles)
    state = _vlkit_state(roles, cfg, where)
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
    model = create_model(ModelConfig(arch="llama", llm=cfg), device="meta")
    check_shapes(model.llm, state, where)
    assign_state_dict(model, {f"llm.{k}": t for k, t in state.items()}, device)
    return model


def _is_clip(raw: tuple[str, Any]) -> bool:
    kind, data = raw
    states = [data] if kind == "dist" else [state for _, state in data.values()]
    return any(_strip(k).startswith(("vision_encoder.", "text_encoder.")) for state in states for k in state)


def _with_weights_facts(cfg: LLMConfig, roles: dict[tuple[str, int], torch.Tensor]) -> LLMConfig:
    from dataclasses import replace

    tied = ("output", -1) not in roles
    bias = ("qkv.bias", 0) in roles
    return replace(cfg, share_embeddings_and_output_weights=tied, bias=bias)


def nemo_llm_config(path: str | Path) -> LLMConfig:
    """The architecture a ``.nemo`` holds, from ``model_config.yaml`` alone (no weights read; the vocabulary size is
    the config's ``padded_vocab_size`` / ``vocab_size`` when it names one, else LLaMA's 32000)."""
    return llm_config_from_nemo(read_nemo_config(path), where=f"{path}:{NEMO_CONFIG}")


def convert_nemo_to_vlkit(src: str | Path, out: str | Path) -> nn.Module:
    """``vlkit convert --from nemo``: a vlkit model directory from a ``.nemo`` (atomic)."""
    from vlkit.interop.files import atomic_write_dir, write_model_files

    model = load_nemo(src)
    extra = {"converted_from": {"format": "nemo", "path": str(src)}}
    atomic_write_dir(Path(out), lambda tmp: write_model_files(model, tmp, extra))
    return model


__all__ = ["NemoArchive", "convert_nemo_to_vlkit", "is_nemo", "llm_config_from_nemo", "load_nemo", "nemo_llm_config",
           "read_nemo_config", "read_nemo_state"]  # fmt: skip
