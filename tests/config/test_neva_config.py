"""NeVA's config: the document's YAML blocks load verbatim (pasted here, and parsed from the document when it is
beside the checkout), mm_cfg validation names its keys, presets carry LLaVA-1.5's recipe, vlkit info counts parts."""

import math
import textwrap
from pathlib import Path

import pytest

from vlkit.config import ConfigError, load_config
from vlkit.models import create_model
from vlkit.utils.flops import count_parameters

SEED = Path(__file__).resolve().parents[3] / "shared" / "seeds" / "003_3ce42468acfde32e.txt"
BASE = "neva-llama2-7b-pretrain"

# The YAML blocks of the NeVA specification (seeds/003), verbatim. NeMo puts them under `model`.
MM = """
mm_cfg:
  use_im_start_end: False
"""
MM_LLM = """
mm_cfg:
  llm:
    from_pretrained: ${data_dir}/neva/checkpoints/llama-2-13b-chat-tp8.nemo
    freeze: False
    model_type: llama_2
"""
MM_VISION = """
mm_cfg:
  vision_encoder:
    from_pretrained: "openai/clip-vit-large-patch14"
    from_hf: True
    patch_dim: 14
    hidden_size: 1024
    vision_select_layer: -2
    class_token_length: 1
    freeze: True
"""
LLM = """
mcore_gpt: False
encoder_seq_length: 4096
position_embedding_type: rope
num_layers: 40
hidden_size: 5120
ffn_hidden_size: 13824
num_attention_heads: 40
hidden_dropout: 0.0
attention_dropout: 0.0
ffn_dropout: 0.0
normalization: rmsnorm
bias: False
activation: 'fast-swiglu'
"""


def under_model(tmp_path, *blocks: str, base: str = BASE, name: str = "cfg") -> Path:
    """Each block in a file of its own under ``model:``, each file based on the previous one (the blocks share top
    keys, so they cannot share a file); returns the last."""
    path = base
    for i, block in enumerate(blocks):
        body = textwrap.indent(textwrap.dedent(block).strip("\n"), "  ")
        file = tmp_path / f"{name}{i}.yaml"
        file.write_text(f"base: {path}\nmodel:\n{body}\n")
        path = file
    return path


def test_multimodal_block(tmp_path):
    cfg = load_config(under_model(tmp_path, MM), ["model.mm_cfg.use_im_start_end=true"])
    assert cfg.model.mm_cfg.use_im_start_end is True
    assert load_config(under_model(tmp_path, MM)).model.mm_cfg.use_im_start_end is False


def test_llm_block_and_data_dir(tmp_path):
    cfg = load_config(under_model(tmp_path, MM_LLM), ["data_dir=/datasets"])
    llm = cfg.model.mm_cfg.llm
    assert llm.from_pretrained == "/datasets/neva/checkpoints/llama-2-13b-chat-tp8.nemo"
    assert (llm.freeze, llm.model_type) == (False, "llama_2")


def test_vision_encoder_block(tmp_path):
    enc = load_config(under_model(tmp_path, MM_VISION)).model.mm_cfg.vision_encoder
    assert (enc.from_pretrained, enc.from_hf, enc.patch_dim, enc.hidden_size) == (
        "openai/clip-vit-large-patch14", True, 14, 1024)  # fmt: skip
    assert (enc.vision_select_layer, enc.class_token_length, enc.freeze) == (-2, 1, True)


def test_main_language_model_block_goes_to_model_llm(tmp_path):
    llm = load_config(under_model(tmp_path, LLM)).model.llm
    assert (llm.num_layers, llm.hidden_size, llm.ffn_hidden_size, llm.num_attention_heads) == (40, 5120, 13824, 40)
    assert (llm.encoder_seq_length, llm.position_embedding_type, llm.normalization) == (4096, "rope", "rmsnorm")
    assert (llm.activation, llm.bias, llm.ffn_dropout) == ("swiglu", False, 0.0)  # fast-swiglu is SwiGLU


def test_all_blocks_together_on_the_tiny_preset(tmp_path):
    # The document's declarations describe CLIP-L/14; neva-tiny's tower is another, so they do not fit it ...
    with pytest.raises(
        ConfigError, match=r"mm_cfg\.vision_encoder\.patch_dim=14 disagrees with model\.vision\.patch_dim=8"
    ):
        load_config(under_model(tmp_path, MM, MM_LLM, MM_VISION.replace('"openai/clip-vit-large-patch14"', "null"),
                                LLM, base="neva-tiny"))  # fmt: skip
    # ... unless the tower comes from the checkpoint they describe (checked when it is loaded).
    cfg = load_config(under_model(tmp_path, MM, MM_LLM, MM_VISION, LLM, base="neva-tiny"))
    assert cfg.model.llm.num_layers == 40 and cfg.model.mm_cfg.vision_encoder.patch_dim == 14


def _yaml_blocks(text: str) -> list[str]:
    """Every ``.. code-block:: yaml`` body of an rst document, dedented."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        i += 1
        if lines[i - 1].strip() != ".. code-block:: yaml":
            continue
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def test_every_block_of_the_document_loads(tmp_path):
    if not SEED.is_file():
        pytest.skip(f"specification document {SEED} not beside the checkout")
    blocks = _yaml_blocks(SEED.read_text())
    assert len(blocks) == 4
    for i, block in enumerate(blocks):
        load_config(under_model(tmp_path, block, name=f"block{i}-"))
    load_config(under_model(tmp_path, *blocks))


def test_defaults_for_arch_neva(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("base: llama-tiny\nmodel:\n  arch: neva\n  vision: {patch_dim: 8, img_h: 32, img_w: 32}\n")
    mm = load_config(path).model.mm_cfg
    assert (mm.mm_mlp_adapter_type, mm.use_im_start_end, mm.pretrain_mm_mlp_adapter) == ("linear", False, None)
    enc = mm.vision_encoder
    assert (enc.vision_select_layer, enc.class_token_length, enc.freeze, mm.llm.freeze) == (-2, 1, True, False)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mm_cfg.mm_mlp_adapter_type=conv", "mm_mlp_adapter_type='conv' is not one of linear, mlp2x_gelu"),
        ("model.mm_cfg.vision_encoder.vision_select_layer=3", "vision_select_layer=3 is outside the 3 hidden states"),
        ("model.mm_cfg.vision_encoder.class_token_length=2", "class_token_length=2 drops more tokens"),
        ("model.mm_cfg.vision_encoder.hidden_size=1024", "hidden_size=1024 disagrees with model.vision.hidden_size=64"),
        ("model.mm_cfg.vision_encoder.crop_size=[16,16]", r"crop_size=\[16, 16\] disagrees"),
        ("model.mm_cfg.vision_encoder.crop_size=[16]", r"must be \[height, width\]"),
        ("model.mm_cfg.llm.model_type=gpt", "model.mm_cfg.llm.model_type='gpt' is not one of nvgpt"),
        ("model.mm_cfg.llm.frezee=true", r"unknown key model\.mm_cfg\.llm\.frezee \(did you mean freeze\?\)"),
    ],
)
def test_invalid_mm_cfg_names_its_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("neva-tiny", [override])


def test_mm_cfg_belongs_to_neva():
    with pytest.raises(ConfigError, match="model.mm_cfg is NeVA's block; model.arch='clip'"):
        load_config("clip-tiny", ["model.mm_cfg.use_im_start_end=true"])


def test_pretrain_preset_is_llava15_stage1():
    cfg = load_config(BASE)
    mm, t = cfg.model.mm_cfg, cfg.trainer
    assert mm.llm.freeze and mm.vision_encoder.freeze and mm.mm_mlp_adapter_type == "linear"  # the document's table
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.name) == (1e-3, 0.0, "cosine")
    assert (t.global_batch_size, t.max_steps) == (256, math.ceil(558128 / 256))  # one epoch of LCS-558K
    assert cfg.schedule.warmup_steps == math.ceil(0.03 * t.max_steps)
    assert cfg.model.llm.encoder_seq_length == 4096 and cfg.data.conv_template == "plain"


def test_finetune_preset_is_llava15_stage2():
    cfg = load_config("neva-llama2-7b-finetune")
    mm, t = cfg.model.mm_cfg, cfg.trainer
    assert not mm.llm.freeze and mm.vision_encoder.freeze and mm.pretrain_mm_mlp_adapter
    assert (cfg.optim.lr, cfg.optim.weight_decay, t.global_batch_size) == (2e-5, 0.0, 128)
    assert t.max_steps == math.ceil(665298 / 128) and cfg.schedule.warmup_steps == math.ceil(0.03 * t.max_steps)
    assert cfg.data.image_aspect_ratio == "pad"
    model = create_model(cfg, device="meta")
    assert count_parameters(model, trainable_only=True) == count_parameters(model.projector) + count_parameters(
        model.llm)  # fmt: skip


def test_info_counts_each_part_and_the_trainable_ones():
    from vlkit.info import describe, format_report

    report = describe(BASE)
    p = report["parameters"]
    # CLIP ViT-L/14 read at hidden_states[-2]: 23 of 24 blocks, no post-norm; 1024 -> 4096 linear; LLaMA-2-7B.
    assert (p["vision"], p["projector"], p["llm"]) == (290_581_504, 4_198_400, 6_738_415_616)
    assert p["total"] == p["vision"] + p["projector"] + p["llm"] and p["trainable"] == p["projector"]
    assert report["sequence_length"] == {"vision": 256, "llm": 4096}
    text = format_report(report, show_config=False)
    assert "projector" in text and "trainable" in text
