"""open_clip interop: tiny random open_clip models converted to vlkit and back must give the same numbers.

Every source model has all its parameters perturbed (open_clip initialises norms to 1/0 and attention biases to 0,
which would hide a swapped norm or a mis-ordered q/k/v bias).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vlkit
from vlkit.interop.native import ModelFormatError
from vlkit.interop.open_clip import (
    builtin_model_config,
    config_from_open_clip,
    is_open_clip_dir,
    load_open_clip,
    looks_like_open_clip_state_dict,
    open_clip_config,
    read_checkpoint,
    save_open_clip,
    to_open_clip_state_dict,
    to_vlkit_state_dict,
)
from vlkit.models.factory import resolve_model_config

open_clip = pytest.importorskip("open_clip")

VOCAB, CTX = 100, 16
TINY = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 64, "heads": 4, "layers": 2},
}


def tiny(quick_gelu=False, vision=None, text=None, **top) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["quick_gelu"] = quick_gelu
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return cfg


def build_open_clip(tmp_path, model_cfg: dict, tag: str = "m"):
    """An open_clip model from a custom config, registered the way open_clip users do (add_model_config)."""
    name = f"vlkit-test-{tmp_path.name}-{tag}"  # the registry is global: one name per test and config
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), path


def save_weights(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def inputs(image_size=(32, 32)):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, *image_size, generator=g)
    ids = torch.randint(1, VOCAB - 1, (3, CTX), generator=g)
    for row, eot in enumerate([3, CTX - 1, 8]):  # end-of-text is the highest id, padding after it
        ids[row, eot] = VOCAB - 1
        ids[row, eot + 1 :] = 0
    return pixels, ids


def assert_parity(oc, vl, image_size=(32, 32)):
    pixels, ids = inputs(image_size)
    vl = vl.eval()
    with torch.no_grad():
        torch.testing.assert_close(vl.encode_image(pixels), oc.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(vl.encode_text(ids), oc.encode_text(ids), atol=1e-5, rtol=0)
        out = vl(pixels, ids)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        torch.testing.assert_close(logits, oc.get_logits(pixels, ids)[0], atol=1e-5, rtol=0)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_import_matches_open_clip_and_round_trips_bit_identical(tmp_path, quick_gelu):
    oc, cfg_path = build_open_clip(tmp_path, tiny(quick_gelu))
    weights = save_weights(oc, tmp_path / "w.safetensors")
    vl = load_open_clip(weights, config=cfg_path)
    activation = "quick_gelu" if quick_gelu else "gelu"
    assert (vl.config.vision.activation, vl.config.text.activation) == (activation, activation)
    assert vl.config.output_dim == 48 and vl.config.vision.hidden_size == 64  # projection dim != width
    assert_parity(oc, vl)
    assert_same_tensors(to_open_clip_state_dict(vl), oc.state_dict())

    # The activation is part of the checkpoint: the other one gives measurably different embeddings.
    flipped = tmp_path / "flipped.json"
    flipped.write_text(json.dumps(tiny(not quick_gelu)))
    wrong = load_open_clip(weights, config=flipped).eval()
    pixels, _ = inputs()
    with torch.no_grad():
        assert (wrong.encode_image(pixels) - oc.encode_image(pixels)).abs().max() > 1e-3


def test_non_square_image_and_other_mapped_options(tmp_path):
    cfg = tiny(
        vision={
            "image_size": [32, 48],
            "head_width": 32,
            "mlp_ratio": 2.5,
            "pool_type": "avg",
            "no_ln_pre": True,
            "norm_kwargs": {"eps": 1e-6},
        },
        text={"heads": 2, "mlp_ratio": 3.0, "pool_type": "eos", "eos_id": VOCAB - 1, "norm_kwargs": {"eps": 1e-6}},
    )
    oc, cfg_path = build_open_clip(tmp_path, cfg)
    vl = load_open_clip(save_weights(oc, tmp_path / "w.safetensors"), config=cfg_path)
    v, t = vl.config.vision, vl.config.text
    assert (v.img_h, v.img_w, v.grid_size, v.num_attention_heads, v.ffn_size) == (32, 48, (4, 6), 2, 160)
    assert v.global_average_pool and not v.pre_norm and v.layernorm_epsilon == 1e-6
    assert (t.num_attention_heads, t.ffn_size, t.eot_token_id, t.layernorm_epsilon) == (2, 192, VOCAB - 1, 1e-6)
    assert_parity(oc, vl, image_size=(32, 48))
    assert_same_tensors(to_open_clip_state_dict(vl), oc.state_dict())


def test_training_checkpoint_with_ddp_prefixes(tmp_path):
    oc, cfg_path = build_open_clip(tmp_path, tiny(True))
    state = {f"module.{k}": v for k, v in oc.state_dict().items()}
    ckpt = tmp_path / "epoch_2.pt"
    torch.save({"epoch": 2, "name": "run", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, ckpt)
    assert list(read_checkpoint(ckpt)) == list(oc.state_dict())
    vl = load_open_clip(ckpt, config=cfg_path)
    assert_parity(oc, vl)


def test_custom_text_layout(tmp_path):
    oc, cfg_path = build_open_clip(tmp_path, tiny(True, custom_text=True, nonscalar_logit_scale=True))
    assert "text.token_embedding.weight" in oc.state_dict() and oc.logit_scale.shape == (1,)
    assert looks_like_open_clip_state_dict(oc.state_dict())
    vl = load_open_clip(save_weights(oc, tmp_path / "w.safetensors"), config=cfg_path)
    assert_parity(oc, vl)


def test_hub_directory_carries_preprocessing(tmp_path):
    oc, _ = build_open_clip(tmp_path, tiny(True))
    hub = tmp_path / "hub"
    hub.mkdir()
    preprocess = {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny(True), "preprocess_cfg": preprocess}))
    torch.save(oc.state_dict(), hub / "open_clip_pytorch_model.bin")
    assert is_open_clip_dir(hub)
    vl = load_open_clip(hub)
    v = vl.config.vision
    assert (v.image_mean, v.image_std, v.resize_interpolation, v.crop_style) == (
        [0.5] * 3,
        [0.25] * 3,
        "bilinear",
        "openai",
    )
    assert_parity(oc, vl)


def randomized_vlkit_clip():
    torch.manual_seed(0)
    model = vlkit.create_model(
        "clip-tiny",
        output_dim=48,
        vision__activation="quick_gelu",
        vision__img_w=48,
        vision__image_mean=[0.5, 0.4, 0.3],
        vision__image_std=[0.2, 0.3, 0.25],
        vision__resize_interpolation="bilinear",
        vision__layernorm_epsilon=1e-6,
        text__activation="quick_gelu",
        text__vocab_size=VOCAB,
        text__encoder_seq_length=CTX,
        text__eot_token_id=VOCAB - 1,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_export_loads_in_open_clip_and_round_trips(tmp_path):
    vl = randomized_vlkit_clip()
    out = save_open_clip(vl, tmp_path / "oc")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    # The offline way to load a custom config with open_clip: the local-dir schema (config + weights in one dir).
    oc = open_clip.create_model("local-dir:" + str(out)).eval()
    assert_parity(oc, vl, image_size=(32, 48))
    pre = oc.visual.preprocess_cfg
    assert (pre["mean"], pre["std"], pre["interpolation"], pre["resize_mode"]) == (
        [0.5, 0.4, 0.3],
        [0.2, 0.3, 0.25],
        "bilinear",
        "shortest",
    )

    back = load_open_clip(out)
    assert back.config == vl.config
    assert_same_tensors(back.state_dict(), vl.state_dict())
    assert_same_tensors(vlkit.load_model(out).state_dict(), vl.state_dict())  # recognised by content


def test_export_refuses_what_open_clip_cannot_express(tmp_path):
    model = vlkit.create_model(
        "clip-tiny",
        device="meta",
        vision__normalization="rmsnorm",
        vision__class_token_length=2,
        text__activation="relu",
    )
    with pytest.raises(ModelFormatError) as err:
        save_open_clip(model, tmp_path / "oc")
    for what in ("model.vision.normalization='rmsnorm'", "class_token_length=2", "model.text.activation='relu'"):
        assert what in str(err.value)
    assert not (tmp_path / "oc").exists()

    # A tokenizer given by path: open_clip will use CLIP's BPE, which can only be right for CLIP's vocabulary.
    own_vocab = vlkit.create_model(
        "clip-tiny", device="meta", text__tokenizer="tok/", text__vocab_size=VOCAB, text__eot_token_id=VOCAB - 1
    )
    with pytest.raises(ModelFormatError, match="tokenizer='tok/' with vocab_size=100"):
        open_clip_config(own_vocab)
    with pytest.warns(UserWarning, match="assumes it is CLIP's BPE"):
        open_clip_config(vlkit.create_model("clip-tiny", device="meta", text__tokenizer="hf-clip-dir/"))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vision_cfg": {"ls_init_value": 1e-5}}, "vision_cfg.ls_init_value=1e-05: layer scale"),
        ({"text_cfg": {"ls_init_value": 1e-5}}, "text_cfg.ls_init_value"),
        ({"vision_cfg": {"attentional_pool": True}}, "attentional pooling"),
        ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ResNet"),
        ({"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}, "timm image towers"),
        ({"text_cfg": {"hf_model_name": "roberta-base"}}, "Hugging Face text towers"),
        ({"text_cfg": {"no_causal_mask": True}}, "text_cfg.no_causal_mask"),
        ({"text_cfg": {"embed_cls": True}}, "text_cfg.embed_cls"),
        ({"init_logit_bias": -10.0}, "logit bias (SigLIP)"),
        ({"multimodal_cfg": {"width": 64}}, "CoCa"),
        ({"vision_cfg": {"frobnicate": 1}}, "vision_cfg.frobnicate: unknown open_clip option"),
    ],
)
def test_unsupported_options_are_refused_by_name(change, named):
    cfg = tiny()
    for key, value in change.items():
        if isinstance(value, dict) and key in cfg:
            cfg[key].update(value)
        else:
            cfg[key] = value
    with pytest.raises(ModelFormatError, match="cannot convert this open_clip model") as err:
        config_from_open_clip(cfg)
    assert named in str(err.value)


def test_squashing_preprocessing_is_refused():
    with pytest.raises(ModelFormatError, match="resize_mode='squash'"):
        config_from_open_clip(tiny(), {"resize_mode": "squash"})


def test_layer_scale_checkpoint_is_refused_before_loading(tmp_path):
    cfg = tiny(vision={"ls_init_value": 0.1}, text={"ls_init_value": 0.1})
    oc, cfg_path = build_open_clip(tmp_path, cfg)
    with pytest.raises(ModelFormatError) as err:
        load_open_clip(save_weights(oc, tmp_path / "w.safetensors"), config=cfg_path)
    assert "vision_cfg.ls_init_value=0.1" in str(err.value) and "text_cfg.ls_init_value=0.1" in str(err.value)


def test_key_and_shape_mismatches_are_listed(tmp_path):
    oc, _ = build_open_clip(tmp_path, tiny())
    cfg = config_from_open_clip(tiny())
    state = dict(oc.state_dict())
    del state["visual.ln_post.weight"]
    state["visual.extra_token"] = torch.zeros(3)
    with pytest.raises(ModelFormatError) as err:
        to_vlkit_state_dict(state, cfg)
    assert "missing: visual.ln_post.weight" in str(err.value) and "unexpected: visual.extra_token" in str(err.value)

    # Weights for 32-px images under a 48-px config: refused, not silently resampled.
    weights = save_weights(oc, tmp_path / "w.safetensors")
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps(tiny(vision={"image_size": 48})))
    with pytest.raises(
        ModelFormatError, match=r"visual.positional_embedding: \[17, 64\] in the checkpoint, \[37, 64\]"
    ):
        load_open_clip(weights, config=bigger)


def test_detection_by_content(tmp_path):
    oc, _ = build_open_clip(tmp_path, tiny())
    keys = list(oc.state_dict())
    assert looks_like_open_clip_state_dict(keys)
    assert looks_like_open_clip_state_dict(f"module.{k}" for k in keys)
    assert not looks_like_open_clip_state_dict(vlkit.create_model("clip-tiny", device="meta").state_dict())
    hf_keys = [
        "vision_model.embeddings.patch_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        "logit_scale",
    ]
    assert not looks_like_open_clip_state_dict(hf_keys)

    out = save_open_clip(randomized_vlkit_clip(), tmp_path / "oc")
    assert is_open_clip_dir(out)
    vlkit.save_model(vlkit.create_model("clip-tiny"), tmp_path / "native")
    assert not is_open_clip_dir(tmp_path / "native")
    assert not is_open_clip_dir(out / "open_clip_model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "open_clip_config.json").write_text("{not json")
    assert not is_open_clip_dir(tmp_path / "broken")


def test_unsafe_and_ambiguous_sources_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling with full pickle would create the marker file
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(ModelFormatError, match="weights_only=True"):
        read_checkpoint(evil)
    assert not marker.exists()
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(tiny()))
    with pytest.raises(ModelFormatError, match="needs its model config: pass model_name"):
        load_open_clip(evil)
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        load_open_clip(tmp_path / "absent.pt", config=cfg_path)


def test_builtin_configs_and_the_quickgelu_suffix(tmp_path, monkeypatch):
    # OpenAI's B/32 weights go with the -quickgelu name; LAION's L/14 and H/14 are GELU.
    b32 = config_from_open_clip(builtin_model_config("ViT-B-32-quickgelu"))
    assert b32.vision.activation == b32.text.activation == "quick_gelu"
    assert config_from_open_clip(builtin_model_config("ViT-L-14")).vision.activation == "gelu"
    with pytest.raises(ModelFormatError, match="did you mean"):
        builtin_model_config("ViT-B-32-quickgelo")

    # The dimensions of the vlkit presets, except H/14's vision heads: LAION's have width 80 (16 heads), the
    # specification table's 64 (20 heads).
    arch = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "output_dim")
    for name, preset, vision_heads in [
        ("ViT-B-32", "clip-b32", 12),
        ("ViT-L-14", "clip-l14", 16),
        ("ViT-H-14", "clip-h14", 16),
    ]:
        got, want = config_from_open_clip(builtin_model_config(name)), resolve_model_config(preset)
        assert [getattr(got.text, k) for k in arch] == [getattr(want.text, k) for k in arch], name
        want.vision.num_attention_heads = vision_heads
        assert [getattr(got.vision, k) for k in (*arch, "patch_dim", "img_h")] == [
            getattr(want.vision, k) for k in (*arch, "patch_dim", "img_h")
        ], name

    # A model name ending in -quickgelu forces QuickGELU even when its config lacks the flag (open_clip's rule).
    oc, _ = build_open_clip(tmp_path, tiny(True))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "Tiny-quickgelu.json").write_text(json.dumps(tiny(False)))
    monkeypatch.setattr(
        "vlkit.interop.open_clip.builtin_model_config",
        lambda name: json.loads((tmp_path / "configs" / f"{name}.json").read_text()),
    )
    vl = load_open_clip(save_weights(oc, tmp_path / "w.safetensors"), model_name="Tiny-quickgelu")
    assert vl.config.vision.activation == "quick_gelu"
    assert_parity(oc, vl)


def test_open_clip_config_of_a_preset():
    cfg = open_clip_config(
        vlkit.create_model("clip-b32", device="meta", vision__activation="quick_gelu", text__activation="quick_gelu")
    )
    ref = builtin_model_config("ViT-B-32-quickgelu")
    assert (cfg["model_cfg"]["embed_dim"], cfg["model_cfg"]["quick_gelu"]) == (ref["embed_dim"], True)
    assert {k: cfg["model_cfg"]["vision_cfg"][k] for k in ref["vision_cfg"]} == ref["vision_cfg"]
    assert {k: cfg["model_cfg"]["text_cfg"][k] for k in ref["text_cfg"]} == ref["text_cfg"]
    assert cfg["preprocess_cfg"]["resize_mode"] == "shortest" and cfg["preprocess_cfg"]["size"] == 224
