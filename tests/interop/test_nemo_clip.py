"""NeMo CLIP .nemo files (Megatron-core names, as NeMo's Hugging Face -> NeMo converter writes them), TP 1 and 2 and
a torch_dist checkpoint, give the same features as the Hugging Face model they were made from."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
import yaml
from hf_models import build_hf, inputs, tiny_config

import vlkit
from vlkit.interop.files import ModelFormatError
from vlkit.interop.hf import load_hf
from vlkit.interop.nemo import load_nemo

LAYER = {"layer_norm1.": "self_attention.linear_qkv.layer_norm_", "layer_norm2.": "mlp.linear_fc1.layer_norm_",
         "self_attn.out_proj.": "self_attention.linear_proj.", "mlp.fc1.": "mlp.linear_fc1.",
         "mlp.fc2.": "mlp.linear_fc2."}  # fmt: skip
TOP = {
    "vision_model.embeddings.patch_embedding.weight": "vision_encoder.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "vision_encoder.position_embeddings.weight",
    "vision_model.pre_layrnorm.weight": "vision_encoder.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "vision_encoder.ln_pre.bias",
    "vision_model.post_layernorm.weight": "vision_encoder.final_layernorm.weight",
    "vision_model.post_layernorm.bias": "vision_encoder.final_layernorm.bias",
    "visual_projection.weight": "vision_encoder.head.weight",
    "text_model.embeddings.token_embedding.weight": "text_encoder.embedding.word_embeddings.weight",
    "text_model.embeddings.position_embedding.weight": "text_encoder.embedding.position_embeddings.weight",
    "text_model.final_layer_norm.weight": "text_encoder.final_layernorm.weight",
    "text_model.final_layer_norm.bias": "text_encoder.final_layernorm.bias",
    "text_projection.weight": "text_encoder.head.weight",
    "logit_scale": "logit_scale",
}


def nemo_state(hf_state: dict, hf_config) -> dict:
    """NeMo's MegatronCLIPModel names for a transformers CLIP state: QKV fused per head [q_h; k_h; v_h]."""
    out = {"vision_encoder.class_token": hf_state["vision_model.embeddings.class_embedding"].reshape(1, 1, -1)}
    for key, t in hf_state.items():
        if key in TOP:
            out[TOP[key]] = t
            continue
        for tower, nemo in (("vision_model.", "vision_encoder."), ("text_model.", "text_encoder.")):
            if not key.startswith(tower + "encoder.layers."):
                continue
            i, rest = key.removeprefix(tower + "encoder.layers.").split(".", 1)
            base = f"{nemo}decoder.layers.{i}."
            heads = (hf_config.vision_config if tower == "vision_model." else hf_config.text_config).num_attention_heads
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [hf_state[f"{tower}encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                per_head = torch.stack([x.reshape(heads, -1, *x.shape[1:]) for x in qkv], dim=1)
                out[f"{base}self_attention.linear_qkv.{kind}"] = per_head.reshape(-1, *qkv[0].shape[1:])
            for ours, theirs in LAYER.items():
                if rest.startswith(ours):
                    out[base + theirs + rest.removeprefix(ours)] = t
    return out


def split(state: dict, tp: int, r: int) -> dict:
    out = {}
    for k, t in state.items():
        if k.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                       "word_embeddings.weight")):  # fmt: skip
            t = t.chunk(tp)[r]
        elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
            t = t.chunk(tp, dim=1)[r]
        out["model." + k] = t.clone()
        if k.endswith("linear_qkv.weight"):
            out["model." + k.replace(".weight", "._extra_state")] = io.BytesIO(b"te")
    return out


def nemo_yaml(c) -> bytes:
    v, t = c.vision_config, c.text_config
    act = {"quick_gelu": "approx-gelu"}[v.hidden_act]  # NeMo's name for x * sigmoid(1.702 x)
    cfg = {
        "mcore_gpt": True, "output_dim": c.projection_dim,
        "vision": {"patch_dim": v.patch_size, "img_h": v.image_size, "img_w": v.image_size, "num_layers":
                   v.num_hidden_layers, "hidden_size": v.hidden_size, "ffn_hidden_size": v.intermediate_size,
                   "num_attention_heads": v.num_attention_heads, "class_token_length": 1, "activation": act,
                   "layernorm_epsilon": v.layer_norm_eps, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]},
        "text": {"encoder_seq_length": t.max_position_embeddings, "num_layers": t.num_hidden_layers,
                 "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
                 "num_attention_heads": t.num_attention_heads, "activation": act,
                 "layernorm_epsilon": t.layer_norm_eps},
    }  # fmt: skip
    return yaml.safe_dump(cfg).encode()


def write_tar(path, files: dict) -> None:
    with tarfile.open(path, "w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-clip")
    model = build_hf(path, tiny_config(legacy_eos=True))
    return model, load_hf(path).eval()


LOCAL_NORMS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


@pytest.mark.parametrize("tp, te", [(1, True), (2, True), (2, False)])
def test_tensor_parallel_ranks_give_the_hf_features(tmp_path, hf, tp, te):
    model, reference = hf
    state = nemo_state(model.state_dict(), model.config)
    if not te:  # Megatron-core's local layers: the norms are modules of their own
        for fused, local in LOCAL_NORMS.items():
            state = {k.replace(fused, local): v for k, v in state.items()}
    files = {"model_config.yaml": nemo_yaml(model.config)}
    for r in range(tp):
        files["model_weights.ckpt" if tp == 1 else f"mp_rank_{r:02d}/model_weights.ckpt"] = saved(split(state, tp, r))
    write_tar(tmp_path / "clip.nemo", files)
    loaded = vlkit.load_model(tmp_path / "clip.nemo").eval()
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), reference.encode_image(pixels), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(ids), reference.encode_text(ids), rtol=0, atol=1e-6)
    assert loaded.config.vision.image_mean == [0.5, 0.4, 0.3] and loaded.config.output_dim == 24


def test_dist_checkpoint_and_legacy_names_refused(tmp_path, hf):
    import torch.distributed.checkpoint as dcp

    model, reference = hf
    state = nemo_state(model.state_dict(), model.config)
    root = tmp_path / "clip-dir"
    (root / "model_weights").mkdir(parents=True)
    (root / "model_config.yaml").write_bytes(nemo_yaml(model.config))
    stacked = {}
    for k, t in state.items():  # Megatron-core's torch_dist: each block's tensors stacked on a layer axis
        if ".decoder.layers." in k:
            tower, rest = k.split(".decoder.layers.")
            i, name = rest.split(".", 1)
            stacked.setdefault(f"model.{tower}.decoder.layers.{name}", {})[int(i)] = t
        else:
            stacked[f"model.{k}"] = t.clone()
    stacked = {k: torch.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v for k, v in stacked.items()}
    dcp.save(stacked, storage_writer=dcp.FileSystemWriter(str(root / "model_weights")), no_dist=True)
    loaded = load_nemo(root).eval()
    pixels, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), reference.encode_image(pixels), rtol=0, atol=1e-6)
    legacy = {"model.vision_encoder.backbone.transformer.layers.0.self_attention.query_key_value.weight": torch.ones(3)}
    files = {"model_config.yaml": nemo_yaml(model.config), "model_weights.ckpt": saved(legacy)}
    write_tar(tmp_path / "legacy.nemo", files)
    with pytest.raises(ModelFormatError, match=r"legacy\.nemo: tensors of no known NeMo CLIP layout.*legacy CLIP"):
        load_nemo(tmp_path / "legacy.nemo")
