"""Hugging Face LlavaForConditionalGeneration -> vlkit NeVA: logits parity, greedy generation parity, weight-name
layouts, prompt id mapping, vlkit convert --from llava, load_model detection, refusals."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlkit
from vlkit.cli import main
from vlkit.interop.hf_llava import (
    hf_ids_to_vlkit,
    load_hf_llava,
    neva_config_from_hf,
    split_llava_state,
    vlkit_ids_to_hf,
)
from vlkit.interop.native import ModelFormatError, detect_format
from vlkit.models.neva import IMAGE_TOKEN_INDEX, NevaModel

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_ID, VOCAB, N = 129, 130, 16  # 32 px / patch 8 = 16 patches
PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
}  # fmt: skip


def hf_llava(strategy="default", layer=-2, tied=False) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6)  # fmt: skip
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, image_seq_length=N + (strategy == "full"),
                      tie_word_embeddings=tied)  # fmt: skip
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init values: norms at 1 and zero biases would hide swapped tensors
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.generation_config.eos_token_id = None  # 20 tokens on both sides, whatever comes out
    return model


def write_dir(path, model):
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model = hf_llava()
    return model, write_dir(tmp_path_factory.mktemp("llava"), model)


def prompts(image_tokens: int = N):
    """Two prompts of different lengths, left-padded: (vlkit ids, mask), (HF ids, mask), pixels."""
    rows = [[1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 11, IMAGE_TOKEN_INDEX, 12]]
    vl_ids, vl_mask = vlkit.models.generate.left_pad(rows)
    hf_ids, hf_mask = vlkit.models.generate.left_pad([vlkit_ids_to_hf(r, IMAGE_ID, image_tokens) for r in rows])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return (vl_ids, vl_mask), (hf_ids, hf_mask), pixels


def assert_same_logits(model, hf, image_tokens=N):
    (ids, mask), (hf_ids, hf_mask), pixels = prompts(image_tokens)
    positions = (hf_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, position_ids=positions).logits
        out = model(ids, pixels, mask, labels=torch.full_like(ids, -100))
    # vlkit pads on the right for a forward pass, the prompts were left-padded for HF: compare the real positions.
    torch.testing.assert_close(out["logits"][out["attention_mask"].bool()], want[hf_mask.bool()], rtol=0, atol=1e-4)


def test_import_gives_hf_logits(llava):
    hf, path = llava
    model = load_hf_llava(path).eval()
    mm = model.config.mm_cfg
    assert (mm.vision_encoder.vision_select_layer, mm.vision_encoder.class_token_length) == (-2, 1)
    assert mm.mm_mlp_adapter_type == "mlp2x_gelu" and model.num_image_tokens == N
    assert len(model.vision_tower.tower.transformer.blocks) == 2  # hidden_states[-2] of 3 blocks: block 3 not kept
    v = model.config.vision
    assert (v.crop_style, v.image_mean, v.resize_interpolation) == ("hf", [0.5, 0.4, 0.3], "bicubic")
    assert model.config.llm.num_query_groups == 2 and model.frozen == ("vision_tower",)
    assert_same_logits(model, hf)


@pytest.mark.parametrize("strategy, layer, tied", [("full", -1, False), ("default", 1, True)])
def test_other_layers_strategies_and_tied_embeddings(tmp_path, strategy, layer, tied):
    hf = hf_llava(strategy, layer, tied)
    model = load_hf_llava(write_dir(tmp_path / "hf", hf)).eval()
    assert model.config.llm.share_embeddings_and_output_weights == tied
    assert model.num_image_tokens == N + (strategy == "full")
    assert_same_logits(model, hf, N + (strategy == "full"))


def test_greedy_generation_equals_hf_generate(llava):
    hf, path = llava
    model = load_hf_llava(path).eval()
    (ids, mask), (hf_ids, hf_mask), pixels = prompts()
    with torch.no_grad():
        want = hf.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, max_new_tokens=20,
                           do_sample=False)[:, hf_ids.shape[1] :]  # fmt: skip
    got = model.generate(ids, pixels, mask, max_new_tokens=20, eos_token_ids=[])
    assert got.tokens.shape == (2, 20) and got.tokens.tolist() == want.tolist()


def test_every_weight_naming_loads_the_same(llava, tmp_path):
    hf, path = llava
    reference = load_hf_llava(path).state_dict()
    in_memory = {k: t.contiguous() for k, t in hf.state_dict().items()}  # transformers 5: model.vision_tower.* ...
    nested = {k.replace("model.vision_tower.", "vision_tower.vision_model."): t for k, t in in_memory.items()}
    for name, state in (("memory", in_memory), ("nested", nested)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        save_file(state, str(d / "model.safetensors"))
        loaded = load_hf_llava(d).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    vision, projector, text = split_llava_state(in_memory)
    assert "encoder.layers.0.self_attn.q_proj.weight" in vision and set(projector) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}  # fmt: skip
    assert "model.layers.1.mlp.up_proj.weight" in text and "lm_head.weight" in text


def test_missing_or_unknown_tensors_are_named(llava, tmp_path):
    _, path = llava
    state = {k: t.contiguous() for k, t in hf_llava().state_dict().items()}
    for name, broken, message in [
        ("missing", {k: t for k, t in state.items() if "linear_2.bias" not in k}, "projector holds"),
        ("extra", {**state, "model.image_newline": torch.zeros(3)}, "not LLaVA's: \\['model.image_newline'\\]"),
        ("layer", {**state, "model.vision_tower.encoder.layers.7.mlp.fc1.bias": torch.zeros(3)}, "layers.7"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        save_file(broken, str(d / "model.safetensors"))
        with pytest.raises(ModelFormatError, match=message):
            load_hf_llava(d)


def test_prompt_ids_map_both_ways():
    ids = [1, 5, *[IMAGE_ID] * N, 7, *[IMAGE_ID] * (2 * N), 8]
    vl = hf_ids_to_vlkit(ids, IMAGE_ID, N)
    assert vl == [1, 5, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 8]
    assert vlkit_ids_to_hf(vl, IMAGE_ID, N) == ids
    assert hf_ids_to_vlkit([1, IMAGE_ID, 2], IMAGE_ID, N) == [1, IMAGE_TOKEN_INDEX, 2]  # unexpanded (older prompts)
    with pytest.raises(ValueError, match="run of 5 image tokens"):
        hf_ids_to_vlkit([1, *[IMAGE_ID] * 5], IMAGE_ID, N)


def test_config_mapping_and_refusals():
    base = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                              "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                              "patch_size": 14}}  # fmt: skip
    # LLaVA-1.5's config.json stores only what differs from LlamaConfig's defaults: the rest is LLaMA-7B's.
    cfg = neva_config_from_hf(base)
    llm = cfg.llm
    assert (llm.num_layers, llm.hidden_size, llm.ffn_hidden_size, llm.vocab_size) == (32, 4096, 11008, 32064)
    assert (cfg.vision.img_h, cfg.vision.patch_dim, cfg.vision.activation) == (336, 14, "quick_gelu")
    for change, message in [
        ({"vision_feature_layer": [-2, -5]}, "one layer only"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu'"),
        ({"vision_feature_select_strategy": "cls"}, "is not default or full"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "only CLIP towers"),
        ({"text_config": {"model_type": "mistral"}}, "not a Hugging Face LLaMA config"),
        ({"model_type": "llava_next"}, "not a Hugging Face LLaVA config"),
    ]:
        with pytest.raises(ModelFormatError, match=message):
            neva_config_from_hf({**base, **change})


def test_convert_cli_and_load_model(llava, tmp_path, capsys):
    hf, path = llava
    assert detect_format(path)[0] == "llava"
    direct = vlkit.load_model(path)
    assert isinstance(direct, NevaModel)
    out = tmp_path / "neva"
    assert main(["convert", "--from", "llava", str(path), "--out", str(out)]) == 0
    assert "(llava) ->" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["arch"] == "neva" and config["converted_from"]["image_token_index"] == IMAGE_ID
    assert {"tokenizer_config.json", "preprocessor_config.json"} <= set(config["tokenizer_files"])
    assert (out / "tokenizer_config.json").is_file()
    model = vlkit.load_model(out).eval()
    assert isinstance(model, NevaModel)
    assert_same_logits(model, hf)
    assert main(["convert", str(path), "--to", "vlkit", "--out", str(tmp_path / "auto")]) == 0  # by content
    assert main(["convert", "--to", "hf", str(out), "--out", str(tmp_path / "back")]) == 2
    assert "NeVA models convert to vlkit directories only" in capsys.readouterr().err
