import math
import textwrap

import pytest

from vlkit.config import ConfigError, list_presets, load_config

# The YAML blocks of the CLIP specification (seeds/000), verbatim.
CLIP_GENERAL = """
model:
  output_dim: 512
  local_loss: False
  gather_with_grad: True
"""
CLIP_VISION = """
vision:
  patch_dim: 16
  img_h: 224
  img_w: 224
  image_mean: null
  image_std: null
  num_channels: 3
  drop_patch_rate: 0.0
  drop_path_rate: 0.0
  global_average_pool: False

  output_dim: ${model.output_dim}
  class_token_length: 8
  encoder_seq_length: 196
  num_layers: 12
  hidden_size: 768
  ffn_hidden_size: 3072
  num_attention_heads: 12
  hidden_dropout: 0.
  attention_dropout: 0.
"""
CLIP_TEXT = """
text:
  output_dim: ${model.output_dim}
  encoder_seq_length: 77
  num_layers: 12
  hidden_size: 512
  ffn_hidden_size: 2048
  num_attention_heads: 8
  hidden_dropout: 0.
  attention_dropout: 0.
"""
# The YAML blocks of the ViT specification (seeds/002), verbatim; NeMo puts them straight under `model`.
VIT_ENCODER = """
encoder_seq_length: 196
max_position_embeddings: ${.encoder_seq_length}
num_layers: 12
hidden_size: 768
ffn_hidden_size: 3072
num_attention_heads: 12
hidden_dropout: 0.1
attention_dropout: 0.
"""
VIT_PATCH = """
vision_pretraining_type: "classify"
num_classes: 1000
patch_dim: 16
img_h: 224
img_w: 224
num_channels: 3
"""


def write_config(tmp_path, base: str, section: str | None, block: str):
    body = textwrap.dedent(block).strip("\n")
    if section:
        body = f"{section}:\n" + textwrap.indent(body, "  ")
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base: {base}\n{body}\n")
    return path


def test_every_preset_loads():
    names = list_presets()
    assert {"clip-b32", "clip-b16", "clip-l14", "clip-h14", "clip-g14", "clip-bigg14", "clip-e14"} <= set(names)
    assert {"vit-b16", "vit-l16", "vit-h16", "vit-h14", "vit-g14", "vit-bigg14", "clip-tiny", "vit-tiny"} <= set(names)
    for name in names:
        assert load_config(name).name == name


def test_clip_general_block(tmp_path):
    cfg = load_config(write_config(tmp_path, "clip-b16", None, CLIP_GENERAL))
    assert (cfg.model.output_dim, cfg.model.local_loss, cfg.model.gather_with_grad) == (512, False, True)


def test_clip_vision_block_means_what_the_document_says(tmp_path):
    cfg = load_config(write_config(tmp_path, "clip-b32", "model", CLIP_VISION), ["model.output_dim=256"])
    v = cfg.model.vision
    assert (v.patch_dim, v.img_h, v.img_w, v.num_channels) == (16, 224, 224, 3)
    assert v.class_token_length == 8 and v.encoder_seq_length == 196 and v.num_patches == 196
    assert v.output_dim == 256  # ${model.output_dim} follows the override
    assert v.image_mean is None and v.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert (v.num_layers, v.hidden_size, v.ffn_hidden_size, v.num_attention_heads) == (12, 768, 3072, 12)


def test_clip_text_block(tmp_path):
    cfg = load_config(write_config(tmp_path, "clip-l14", "model", CLIP_TEXT))
    t = cfg.model.text
    assert (t.encoder_seq_length, t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads) == (
        77,
        12,
        512,
        2048,
        8,
    )
    assert t.output_dim == cfg.model.output_dim == 768


@pytest.mark.parametrize("block", [VIT_ENCODER, VIT_PATCH])
def test_vit_blocks_load_under_model(tmp_path, block):
    cfg = load_config(write_config(tmp_path, "vit-b16", "model", block))
    v = cfg.model.vision
    assert (v.hidden_size, v.num_layers, v.patch_dim, cfg.model.num_classes) == (768, 12, 16, 1000)


def test_vit_encoder_block_relative_interpolation(tmp_path):
    cfg = load_config(write_config(tmp_path, "vit-b16", "model", VIT_ENCODER))
    assert cfg.model.vision.max_position_embeddings == 196
    assert cfg.model.vision.hidden_dropout == 0.1


def test_optimisation_table_options_map_to_native_keys():
    cfg = load_config(
        "clip-b16",
        [
            "model.tensor_model_parallel_size=2",
            "model.vision.activations_checkpoint_granularity=full",
            "model.vision.activations_checkpoint_method=block",
            "model.vision.activations_checkpoint_num_layers=4",
            "model.megatron_amp_O2=True",
            "trainer.precision=bf16",
            'model.optim.name="distributed_fused_adam"',
            "model.vision.use_flash_attention=True",
        ],
    )
    assert cfg.parallel.tensor_parallel_size == 2
    v = cfg.model.vision
    assert (v.activations_checkpoint_granularity, v.activations_checkpoint_method) == ("full", "block")
    assert v.activations_checkpoint_num_layers == 4 and v.use_flash_attention
    assert cfg.trainer.amp_O2 and cfg.trainer.precision == "bf16"
    assert cfg.optim.name == "adamw" and cfg.parallel.data_parallel == "fsdp"


def test_vit_flat_optimisation_keys_go_to_the_vision_tower():
    cfg = load_config(
        "vit-b16",
        [
            "model.activations_checkpoint_granularity=selective",
            "model.activations_checkpoint_method=uniform",
            "model.use_flash_attention=True",
        ],
    )
    assert cfg.model.vision.activations_checkpoint_granularity == "selective"
    assert cfg.model.vision.use_flash_attention


@pytest.mark.parametrize(
    "value, expected", [("bf16-mixed", "bf16"), ("16", "fp16"), ("32", "fp32"), ("16-mixed", "fp16")]
)
def test_precision_aliases(value, expected):
    assert load_config("clip-tiny", [f"trainer.precision={value}"]).trainer.precision == expected


def test_nemo_schedule_moves_under_schedule():
    cfg = load_config("clip-tiny", ["model.optim.sched.name=CosineAnnealing", "model.optim.sched.warmup_steps=7"])
    assert (cfg.schedule.name, cfg.schedule.warmup_steps) == ("cosine", 7)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key model\.vision\.hiden_size \(did you mean hidden_size\?\)"):
        load_config("clip-b16", ["model.vision.hiden_size=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: clip-tiny\ntrainer:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key trainer\.max_step \(did you mean max_steps\?\)"):
        load_config(path)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean clip-b16"):
        load_config("clip-b61")


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["model.vision.hidden_size=770"], ["model.vision.hidden_size=770", "model.vision.num_attention_heads=12"]),
        (["model.vision.img_h=230"], ["model.vision.img_h=230", "model.vision.patch_dim=16"]),
        (["parallel.tensor_parallel_size=5"], ["parallel.tensor_parallel_size=5", "model.text.num_attention_heads=8"]),
        (["model.text.num_layers=0"], ["model.text.num_layers=0"]),
        (["model.vision.patch_dim=-16"], ["model.vision.patch_dim=-16"]),
        (["model.output_dim=0"], ["model.output_dim=0"]),
        (["model.vision.img_h=448"], ["model.vision.encoder_seq_length=196"]),
        (["data.clip_crop_scale=[0.5,2.0]"], ["data.clip_crop_scale=[0.5, 2.0]"]),
        (["data.crop_scale=[0.5]"], ["data.crop_scale=[0.5]"]),
    ],
)
def test_invalid_combinations_name_their_keys(tmp_path, overrides, keys):
    path = write_config(tmp_path, "clip-b16", "model", CLIP_VISION) if "img_h=448" in overrides[0] else "clip-b16"
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    for key in keys:
        assert key in str(err.value)


def test_clip_l14_text_tower_tensor_parallel_sizes():
    # 12 text heads: TP in {1, 2, 3, 4, 6, 12} for that tower; the vision tower's 16 heads narrow it to {1, 2, 4}.
    for tp in (1, 2, 4):
        load_config("clip-l14", [f"parallel.tensor_parallel_size={tp}"])
    for tp in (3, 8):
        with pytest.raises(ConfigError, match="does not divide"):
            load_config("clip-l14", [f"parallel.tensor_parallel_size={tp}"])


def test_type_error_names_the_key():
    with pytest.raises(ConfigError, match="model.vision.hidden_size"):
        load_config("clip-tiny", ["model.vision.hidden_size=abc"])


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config("clip-tiny", ["model.vision.num_layers=0", "optim.lr=-1"])
    assert "model.vision.num_layers=0" in str(err.value) and "optim.lr=-1" in str(err.value)


def test_pipeline_parallel_rejected_clearly():
    load_config("clip-tiny", ["model.pipeline_model_parallel_size=1"])
    with pytest.raises(ConfigError, match="pipeline"):
        load_config("clip-tiny", ["model.pipeline_model_parallel_size=2"])


def test_logit_scale_defaults():
    m = load_config("clip-b16").model
    assert m.logit_scale_init == pytest.approx(math.log(1 / 0.07))
    assert m.logit_scale_max == pytest.approx(math.log(100))


def test_base_cycle_detected(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def _seed_yaml_blocks(path):
    """Every ``.. code-block:: yaml`` body of a specification document, dedented."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == ".. code-block:: yaml":
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        else:
            i += 1
    return blocks


@pytest.mark.parametrize(
    "seed, base", [("000_8fae1bc5b32664d7.txt", "clip-b16"), ("002_af2a8b5df20aa7e0.txt", "vit-b16")]
)
def test_specification_documents_blocks_load(tmp_path, seed, base):
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "shared" / "seeds" / seed
    if not path.is_file():
        pytest.skip(f"specification document {path} not beside the checkout")
    blocks = _seed_yaml_blocks(path)
    assert len(blocks) >= 2
    for block in blocks:
        first_key = block.split(":", 1)[0].strip()
        section = None if first_key == "model" else "model"
        load_config(write_config(tmp_path, base, section, block))


def test_a_directory_given_as_the_config_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config: give a preset name"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
