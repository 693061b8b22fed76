"""Hugging Face transformers CLIP <-> vlkit: tiny random models converted both ways must give the same numbers."""

import copy
import json
import math
import shutil

import pytest
import torch
from hf_models import BOS, CTX, EOT, VOCAB, build_hf, inputs, perturbed, tiny_config
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModel

import vlkit
from vlkit.interop.hf import convert_hf_to_vlkit, fuse_qkv, load_hf, save_hf, unfuse_qkv, write_clip_bpe
from vlkit.interop.native import ModelFormatError
from vlkit.interop.vision import VisionEncoder

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """One tiny QuickGELU CLIPModel directory (with tokenizer and preprocessor) shared by the read-only tests."""
    path = tmp_path_factory.mktemp("hf")
    return build_hf(path), path


@pytest.fixture(scope="module")
def converted(hf_dir):
    return vlkit.load_model(hf_dir[1]).eval()


def hf_features(hf, pixels, ids, **kw):
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels, **kw)
        image = hf.get_image_features(pixel_values=pixels, **kw).pooler_output
        text = hf.get_text_features(input_ids=ids).pooler_output
    return image, text, out.logits_per_image


def vlkit_features(model, pixels, ids):
    with torch.no_grad():
        out = model(pixels, ids)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        return model.encode_image(pixels), model.encode_text(ids), logits


def assert_parity(hf, model, image_size=(32, 32), **kw):
    pixels, ids = inputs(image_size)
    for name, a, b in zip(
        ("image", "text", "logits"), hf_features(hf, pixels, ids, **kw), vlkit_features(model, pixels, ids)
    ):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < TOL, name


@pytest.mark.parametrize("act, legacy_eos", [("quick_gelu", False), ("gelu", True)])
def test_hf_to_vlkit_parity(tmp_path, act, legacy_eos):
    hf = build_hf(tmp_path, tiny_config(act, legacy_eos))
    model = vlkit.load_model(tmp_path).eval()
    assert_parity(hf, model)
    cfg = model.config
    assert (cfg.vision.activation, cfg.text.activation) == (act, act)
    assert (cfg.output_dim, cfg.vision.hidden_size, cfg.text.hidden_size) == (24, 48, 32)
    assert (cfg.vision.ffn_hidden_size, cfg.text.ffn_hidden_size, cfg.text.encoder_seq_length) == (96, 80, CTX)
    assert cfg.vision.layernorm_epsilon == cfg.text.layernorm_epsilon == 1e-6
    # Both rules (first eos; argmax for eos_token_id=2) find the end-of-text token, the vocabulary's last id.
    assert cfg.text.eot_token_id == EOT
    # CLIPImageProcessor's settings travel with the weights.
    v = cfg.vision
    assert (v.crop_style, v.resize_interpolation, v.img_h, v.img_w) == ("hf", "bilinear", 32, 32)
    assert v.image_mean == [0.5, 0.4, 0.3] and v.image_std == [0.2, 0.25, 0.3]


def test_logit_scale_above_ln100_is_kept(tmp_path):
    """OpenAI's checkpoints store 4.6052, a hair above ln 100: vlkit's clamp must not shave it off."""
    hf = build_hf(tmp_path)
    with torch.no_grad():
        hf.logit_scale.fill_(4.6052)
    hf.save_pretrained(tmp_path)
    model = vlkit.load_model(tmp_path).eval()
    assert model.config.logit_scale_max == pytest.approx(4.6052) and model.config.logit_scale_max > math.log(100)
    assert model.scale().item() == pytest.approx(math.exp(4.6052), rel=1e-6)
    assert_parity(hf, model)


def test_vlkit_to_hf_export_parity(tmp_path):
    torch.manual_seed(0)
    model = perturbed(vlkit.create_model("clip-tiny", vision__activation="quick_gelu", output_dim=40), seed=3)
    save_hf(model, tmp_path / "hf")
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.projection_dim == 40 and hf.config.vision_config.hidden_act == "quick_gelu"
    assert hf.config.text_config.hidden_act == "gelu" and hf.config.text_config.eos_token_id == 49407
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = vlkit.get_tokenizer("clip")(["a photo of a cat", "two dogs on the grass"])
    for a, b in zip(hf_features(hf, pixels, ids), vlkit_features(model, pixels, ids)):
        assert (a - b).abs().max().item() < TOL
    # The CLIP tokenizer is written as transformers files, padding with end-of-text and 77 positions.
    tok = CLIPTokenizer.from_pretrained(tmp_path / "hf")
    hf_ids = tok(["a photo of a cat"], padding="max_length", return_tensors="pt")["input_ids"]
    assert hf_ids.shape == (1, 77)
    assert hf_ids[0, :7].tolist() == ids[0, :7].tolist() and (hf_ids[0, 7:] == 49407).all()
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 32, "width": 32} and pre["resample"] == 3


def _same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_hf_vlkit_hf_is_bit_identical(tmp_path):
    build_hf(tmp_path / "src", tiny_config("gelu"))
    save_hf(vlkit.load_model(tmp_path / "src"), tmp_path / "back")
    _same_tensors(load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors"))
    # The tokenizer files the vlkit model points to are handed on.
    assert (tmp_path / "back" / "vocab.json").read_text() == (tmp_path / "src" / "vocab.json").read_text()


def test_round_trip_vlkit_hf_vlkit_is_bit_identical(tmp_path):
    model = perturbed(vlkit.create_model("clip-tiny", vision__activation="quick_gelu"))
    save_hf(model, tmp_path / "hf")
    again = vlkit.load_model(tmp_path / "hf")
    _same_tensors(model.state_dict(), again.state_dict())
    assert again.config.vision.activation == "quick_gelu" and again.config.text.tokenizer == "clip"


def test_qkv_layout_round_trips_and_interleaves_heads():
    q, k, v = (torch.arange(8.0) + 100 * i for i in range(3))  # 2 heads of dim 4
    fused = fuse_qkv(q, k, v, num_heads=2)
    assert fused.tolist()[:12] == [*q[:4].tolist(), *k[:4].tolist(), *v[:4].tolist()]  # head 0: q, k, v
    assert all(torch.equal(a, b) for a, b in zip(unfuse_qkv(fused, 2), (q, k, v)))
    w = torch.randn(3 * 48, 48)
    assert torch.equal(fuse_qkv(*unfuse_qkv(w, 4), num_heads=4), w)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_and_pickled_weights(tmp_path, layout):
    if layout == "sharded":
        hf = build_hf(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    else:
        hf = build_hf(tmp_path)
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_parity(hf, vlkit.load_model(tmp_path).eval())


def test_shard_index_cannot_point_outside(tmp_path):
    build_hf(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../elsewhere.safetensors" for k in index["weight_map"]}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="not a file name"):
        vlkit.load_model(tmp_path / "m")


def test_tokenizer_parity_and_it_travels_with_the_directory(hf_dir, tmp_path):
    hf, src = hf_dir
    convert_hf_to_vlkit(src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tokenizer_files"] == ["vocab.json", "merges.txt"]
    texts = ["a photo of a cat", "The RED circle, on the blue square!", "dogs & cats: 3 of them", "grün"]
    hf_tok = CLIPTokenizer.from_pretrained(src)
    ours = vlkit.get_tokenizer(tmp_path / "out", context_length=CTX)
    ids = ours(texts)
    for row, expected in zip(ids.tolist(), hf_tok(texts)["input_ids"]):
        assert row[: len(expected)] == expected and set(row[len(expected) :]) <= {0}
    # End to end: each side tokenizes with its own tokenizer (transformers pads with end-of-text, vlkit with 0).
    hf_ids = hf_tok(texts, padding="max_length", max_length=CTX, return_tensors="pt")["input_ids"]
    shutil.move(tmp_path / "out", tmp_path / "moved")  # the tokenizer follows the directory
    model = vlkit.load_model(tmp_path / "moved").eval()
    assert model.config.text.tokenizer == str((tmp_path / "moved").resolve())
    with torch.no_grad():
        a = hf.get_text_features(input_ids=hf_ids).pooler_output
        b = model.encode_text(vlkit.get_tokenizer(model.config.text.tokenizer, CTX)(texts))
    assert (a - b).abs().max().item() < TOL


def test_openai_vocabulary_is_recorded_as_clip(tmp_path):
    cfg = tiny_config()
    cfg.text_config.vocab_size, cfg.text_config.eos_token_id = 49408, 49407
    build_hf(tmp_path / "src", cfg, tokenizer=False)
    write_clip_bpe(tmp_path / "src", CTX)
    convert_hf_to_vlkit(tmp_path / "src", tmp_path / "out")
    assert vlkit.load_model(tmp_path / "out").config.text.tokenizer == "clip"  # portable: no path recorded


def test_non_square_images(hf_dir, converted, tmp_path):
    """transformers CLIP is square, but both run a square model on other shapes by resampling the position table."""
    hf, path = hf_dir
    assert_parity(hf, converted, image_size=(32, 48), interpolate_pos_encoding=True)
    wide = vlkit.load_model(path, vision__img_h=32, vision__img_w=48).eval()  # a 4 x 6 grid from the 4 x 4 one
    assert wide.visual.pos_embed.shape == (1 + 24, 48)
    assert_parity(hf, wide, image_size=(32, 48), interpolate_pos_encoding=True)
    with pytest.raises(ModelFormatError, match="transformers CLIP is square"):
        save_hf(wide, tmp_path / "out")


def test_export_lists_every_unsupported_feature(tmp_path):
    model = vlkit.create_model("clip-tiny", text__pooling="first", text__normalization="rmsnorm")
    with pytest.raises(ModelFormatError) as e:
        save_hf(model, tmp_path / "out")
    assert "model.text.pooling" in str(e.value) and "model.text.normalization" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_their_config(tmp_path):
    build_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64  # the weights have 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    # Found from the safetensors header against the config on the meta device, before the weights are read.
    fc1 = r"tensor text\.transformer\.blocks\.0\.mlp\.fc1\.weight is stored as \[80, 32\], the config implies "
    fc1 += r"\[64, 32\]"
    with pytest.raises(ModelFormatError, match=r"config.json: the weights do not fit the config: " + fc1):
        vlkit.load_model(tmp_path)
    config["text_config"].update(intermediate_size=80, num_hidden_layers=3)  # the weights have 2 layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"weights miss 16 tensors .*text_model.encoder.layers.2"):
        vlkit.load_model(tmp_path)


def test_unsupported_activation_is_named(tmp_path):
    build_hf(tmp_path, tiny_config("silu"))
    with pytest.raises(ModelFormatError, match="hidden_act='silu'"):
        load_hf(tmp_path)


# -- the vision encoder (NeVA) -----------------------------------------------------------------------------------------


def test_vision_encoder_matches_hidden_states(hf_dir, converted):
    """Every index of transformers' hidden_states (embeddings after the pre-norm, then each block's output)."""
    hf, path = hf_dir
    pixels, _ = inputs()
    with torch.no_grad():
        states = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        for select_layer in range(-4, 4):
            patches = VisionEncoder(copy.deepcopy(converted.visual), select_layer)
            tokens = VisionEncoder(copy.deepcopy(converted.visual), select_layer, drop_class_token=False)
            assert patches.config.num_layers == len(patches.tower.transformer.blocks) == select_layer % 4
            assert (patches(pixels) - states[select_layer][:, 1:]).abs().max().item() < TOL, select_layer
            assert (tokens(pixels) - states[select_layer]).abs().max().item() < TOL, select_layer
        encoder = vlkit.load_vision_encoder(path)  # select_layer=-2, patches only
        assert encoder.hidden_size == 48 and encoder.config.output_dim is None
        assert encoder(pixels).shape == (3, 16, 48) and encoder.num_tokens == 16
        assert (encoder(pixels) - states[-2][:, 1:]).abs().max().item() < TOL


def test_vision_encoder_from_every_source(tmp_path):
    """A CLIPVisionModel directory (transformers 5 saves it without the vision_model. prefix), a vlkit directory
    and an open_clip directory give the same features."""
    hf = build_hf(tmp_path / "clip")
    tower = CLIPVisionModel(hf.config.vision_config)
    getattr(tower, "vision_model", tower).load_state_dict(hf.vision_model.state_dict())  # transformers 4 nests it
    tower.save_pretrained(tmp_path / "vision")
    model = vlkit.load_model(tmp_path / "clip")
    vlkit.save_model(model, tmp_path / "vlkit")
    from vlkit.interop.open_clip import save_open_clip

    # open_clip knows only CLIP's BPE and OpenAI's crop; neither matters to the vision features under test here.
    model.config.text.tokenizer, model.config.vision.crop_style = "clip", "openai"
    save_open_clip(model, tmp_path / "open_clip")
    pixels, _ = inputs()
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        for source in ("clip", "vision", "vlkit", "open_clip"):
            got = vlkit.load_vision_encoder(tmp_path / source)(pixels)
            assert (got - expected).abs().max().item() < TOL, source
        big = vlkit.load_vision_encoder(tmp_path / "vision", vision__img_h=48, vision__img_w=48)
        assert big(torch.randn(1, 3, 48, 48)).shape == (1, 36, 48) and big.num_tokens == 36


def test_vision_encoder_of_a_vit_classifier_drops_all_its_class_tokens(tmp_path):
    vlkit.save_model(perturbed(vlkit.create_model("vit-tiny", vision__class_token_length=8)), tmp_path / "vit")
    classifier = vlkit.load_model(tmp_path / "vit").eval()
    encoder = vlkit.load_vision_encoder(tmp_path / "vit", select_layer=-1)
    pixels = torch.randn(2, 3, classifier.config.vision.img_h, classifier.config.vision.img_w)
    prefix = classifier.config.vision.class_token_length
    with torch.no_grad():
        _, states = classifier.backbone.forward_intermediates(pixels)
        assert torch.equal(encoder(pixels), states[-1][:, prefix:])
    assert prefix == 8 and encoder.num_tokens == classifier.config.vision.num_patches == 16


def test_vision_encoder_rejects_a_layer_out_of_range(converted):
    with pytest.raises(ValueError, match=r"select_layer=-5 .*valid: -4\.\.3"):
        VisionEncoder(copy.deepcopy(converted.visual), select_layer=-5)
    with pytest.raises(ValueError, match=r"select_layer=4 "):
        VisionEncoder(copy.deepcopy(converted.visual), select_layer=4)


def test_bos_and_vocab_in_exported_config(converted, tmp_path):
    save_hf(converted, tmp_path / "back")
    text = json.loads((tmp_path / "back" / "config.json").read_text())["text_config"]
    assert (text["vocab_size"], text["eos_token_id"], text["bos_token_id"]) == (VOCAB, EOT, BOS)
