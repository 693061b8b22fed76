"""Test helpers: ``.nemo`` files in NeMo's documented layouts, written from a vlkit LLaMA by the inverse mapping
(Megatron names, tensor-parallel splits), independently of vlkit.interop.nemo."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
import yaml

from vlkit.nn.attention import unfuse_qkv


def nemo_config(cfg, tp: int = 1, pp: int = 1, mcore: bool = True) -> dict:
    """A model_config.yaml of NeMo's LLaMA-2 recipes for vlkit's LLMConfig ``cfg``."""
    return {
        "mcore_gpt": mcore,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "encoder_seq_length": cfg.encoder_seq_length,
        "max_position_embeddings": cfg.encoder_seq_length,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "init_method_std": 0.02,
        "normalization": "rmsnorm",
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "bias": False,
        "activation": "fast-swiglu",
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128,
        "precision": "bf16",
        "tokenizer": {"library": "sentencepiece", "model": "nemo:a1b2_tokenizer.model"},
    }


def megatron_layer(sd: dict, cfg, i: int) -> dict[str, torch.Tensor]:
    """Block i in Megatron's whole-model layout: QKV rows per query group [q heads of g; k_g; v_g], fc1 [gate; up]."""
    b = f"transformer.blocks.{i}"
    heads, kv = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    q, k, v = unfuse_qkv(sd[f"{b}.attn.qkv.weight"], heads, kv)
    d, rep = cfg.hidden_size // heads, heads // kv
    rows = []
    for g in range(kv):
        rows += [q[g * rep * d : (g + 1) * rep * d], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return {
        "norm1": sd[f"{b}.norm1.weight"],
        "qkv": torch.cat(rows),
        "proj": sd[f"{b}.attn.proj.weight"],
        "norm2": sd[f"{b}.norm2.weight"],
        "gate": sd[f"{b}.mlp.gate.weight"],
        "up": sd[f"{b}.mlp.up.weight"],
        "fc2": sd[f"{b}.mlp.down.weight"],
    }


def rank_states(model, tp: int, pp: int = 1, mcore: bool = True) -> dict[tuple[int, int], dict]:
    """{(pp, tp): the state dict that rank saves}, with Transformer Engine's pickled _extra_state entries."""
    cfg, sd = model.llm.config, model.llm.state_dict()
    per_stage = cfg.num_layers // pp
    out = {}
    for s in range(pp):
        for r in range(tp):
            state = {}

            def put(name: str, t: torch.Tensor, state: dict = state) -> None:
                state["model." + name] = t.clone()

            pre = "language_model." if not mcore else ""
            if s == 0:
                put(f"{pre}embedding.word_embeddings.weight", sd["embed.weight"].chunk(tp)[r])
            if s == pp - 1:
                put("decoder.final_layernorm.weight" if mcore else "language_model.encoder.final_layernorm.weight",
                    sd["norm.weight"])  # fmt: skip
                put(f"{pre}output_layer.weight", sd["lm_head.weight"].chunk(tp)[r])
            for local in range(per_stage):
                m = megatron_layer(sd, cfg, s * per_stage + local)
                fc1 = torch.cat([m["gate"].chunk(tp)[r], m["up"].chunk(tp)[r]])
                if mcore:  # Transformer Engine modules: the norms live in the fused linear layers
                    p = f"decoder.layers.{local}."
                    put(p + "self_attention.linear_qkv.layer_norm_weight", m["norm1"])
                    put(p + "self_attention.linear_qkv.weight", m["qkv"].chunk(tp)[r])
                    put(p + "self_attention.linear_proj.weight", m["proj"].chunk(tp, dim=1)[r])
                    put(p + "mlp.linear_fc1.layer_norm_weight", m["norm2"])
                    put(p + "mlp.linear_fc1.weight", fc1)
                    put(p + "mlp.linear_fc2.weight", m["fc2"].chunk(tp, dim=1)[r])
                    for te in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                               "mlp.linear_fc2", "self_attention.core_attention"):  # fmt: skip
                        state[f"model.{p}{te}._extra_state"] = io.BytesIO(b"fp8 meta, never read")
                else:
                    if local == 0:  # legacy RotaryEmbedding's persistent buffer, on every stage
                        half_head = cfg.hidden_size // cfg.num_attention_heads // 2
                        put("language_model.rotary_pos_emb.inv_freq", torch.ones(half_head))
                    p = f"language_model.encoder.layers.{local}."
                    put(p + "input_layernorm.weight", m["norm1"])
                    put(p + "self_attention.query_key_value.weight", m["qkv"].chunk(tp)[r])
                    put(p + "self_attention.dense.weight", m["proj"].chunk(tp, dim=1)[r])
                    put(p + "post_attention_layernorm.weight", m["norm2"])
                    put(p + "mlp.dense_h_to_4h.weight", fc1)
                    put(p + "mlp.dense_4h_to_h.weight", m["fc2"].chunk(tp, dim=1)[r])
            out[(s, r)] = state
    return out


def dist_state(model) -> dict:
    """Megatron-core's torch_dist content: global tensors, each block's stacked on a leading layer axis."""
    cfg, sd = model.llm.config, model.llm.state_dict()
    layers = [megatron_layer(sd, cfg, i) for i in range(cfg.num_layers)]

    def stack(key):
        return torch.stack([m[key] for m in layers])

    p = "model.decoder.layers."
    state = {
        "model.embedding.word_embeddings.weight": sd["embed.weight"].clone(),
        "model.decoder.final_layernorm.weight": sd["norm.weight"].clone(),
        "model.output_layer.weight": sd["lm_head.weight"].clone(),
        p + "self_attention.linear_qkv.layer_norm_weight": stack("norm1"),
        p + "self_attention.linear_qkv.weight": stack("qkv"),
        p + "self_attention.linear_proj.weight": stack("proj"),
        p + "mlp.linear_fc1.layer_norm_weight": stack("norm2"),
        p + "mlp.linear_fc1.weight": torch.stack([torch.cat([m["gate"], m["up"]]) for m in layers]),
        p + "mlp.linear_fc2.weight": stack("fc2"),
        p + "self_attention.linear_qkv._extra_state": io.BytesIO(b"fp8 meta, never read"),
    }
    return state


def write_nemo(path: Path, model, *, tp: int = 1, pp: int = 1, mcore: bool = True, layout: str = "rank",
               extract: bool = False) -> Path:  # fmt: skip
    """A .nemo of ``model`` (a vlkit LlamaForCausalLM): ``layout`` rank (per-rank model_weights.ckpt: at the root for
    TP=PP=1, mp_rank_XX/ for PP=1, tp_rank_XX_pp_rank_YYY/ otherwise) or dist (a model_weights/ torch_dist
    checkpoint). ``extract``: write the extracted directory instead of the tar."""
    import torch.distributed.checkpoint as dcp

    root = path.with_suffix(".dir") if not extract else path
    root.mkdir(parents=True)
    (root / "model_config.yaml").write_text(yaml.safe_dump(nemo_config(model.llm.config, tp, pp, mcore)))
    (root / "a1b2_tokenizer.model").write_bytes(b"sentencepiece model (unused)")
    if layout == "dist":
        dcp.save(dist_state(model), storage_writer=dcp.FileSystemWriter(str(root / "model_weights")), no_dist=True)
        (root / "model_weights" / "metadata.json").write_text(
            json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"})
        )
        torch.save({}, root / "model_weights" / "common.pt")
    else:
        for (s, r), state in rank_states(model, tp, pp, mcore).items():
            if tp == 1 and pp == 1:
                file = root / "model_weights.ckpt"
            elif pp == 1:
                file = root / f"mp_rank_{r:02d}" / "model_weights.ckpt"
            else:
                file = root / f"tp_rank_{r:02d}_pp_rank_{s:03d}" / "model_weights.ckpt"
            file.parent.mkdir(exist_ok=True)
            torch.save(state, file)
    if extract:
        return root
    with tarfile.open(path, "w:") as tar:  # NeMo's save_to: an uncompressed tar, members under ./
        tar.add(root, arcname=".")
    return path
