"""build_neva_model: pretrained vision tower and LLM from the paths mm_cfg names, stage-1 adapters, refusals."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

import vlkit
from vlkit.config import load_config
from vlkit.interop.native import ModelFormatError, build_neva_model
from vlkit.interop.neva import load_adapter
from vlkit.models.neva import trainable_state_dict
from vlkit.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A vlkit CLIP with a 3-block, 48-wide image tower and a Hugging Face LLaMA with 160 tokens, on disk."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = vlkit.create_model("clip-tiny", **{"vision.num_layers": 3, "vision.hidden_size": 48})
    vlkit.save_model(clip, root / "clip")
    llama = HFLlama(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=160, max_position_embeddings=512)).eval()  # fmt: skip
    llama.save_pretrained(root / "llama")
    return clip, llama, root


def config(root, *overrides):
    vision = f"model.mm_cfg.vision_encoder.from_pretrained={root / 'clip'}"
    return load_config("neva-tiny", [vision, f"model.mm_cfg.llm.from_pretrained={root / 'llama'}", *overrides]).model


def test_pretrained_parts_replace_the_configured_architecture(parts):
    clip, llama, root = parts
    model, notes = build_neva_model(config(root, "model.llm.hidden_dropout=0.1"))
    v, llm = model.config.vision, model.config.llm
    assert (v.num_layers, v.hidden_size, llm.vocab_size, llm.num_query_groups) == (3, 48, 160, 4)
    assert llm.encoder_seq_length == 256 and llm.hidden_dropout == 0.1  # the run's settings stay
    assert any("model.vision.num_layers: 2 -> 3" in n for n in notes) and any("vocab_size" in n for n in notes)
    blocks = model.vision_tower.tower.transformer.blocks
    assert len(blocks) == 2  # hidden_states[-2] of 3 blocks
    assert torch.equal(blocks[1].mlp.fc1.weight, clip.visual.transformer.blocks[1].mlp.fc1.weight)
    assert torch.equal(model.llm.embed.weight, llama.model.embed_tokens.weight)
    assert tuple(model.projector[0].weight.shape) == (64, 48) and model.projector[0].weight.abs().sum() > 0
    assert model.frozen == ("vision_tower",) and not any(t.is_meta for t in model.state_dict().values())
    ids = torch.tensor([[1, -200, 5]])
    assert model(ids, torch.randn(1, 3, 32, 32)).shape == (1, 2 + 16, 160)


def test_crop_size_and_start_end_tokens(parts):
    _, llama, root = parts
    model, _ = build_neva_model(
        config(root, "model.mm_cfg.vision_encoder.crop_size=[48,48]", "model.mm_cfg.use_im_start_end=true")
    )
    assert (model.config.vision.img_h, model.num_image_tokens) == (48, 36 + 2)
    mean = llama.model.embed_tokens.weight.mean(0)  # LLaVA's start for new token embeddings
    torch.testing.assert_close(model.im_start.detach(), mean)
    assert model.encode_images(torch.randn(1, 3, 48, 48)).shape == (1, 38, 64)


def test_a_vlkit_llama_directory_and_random_vision(parts, tmp_path):
    torch.manual_seed(1)
    llama = vlkit.create_model("llama-tiny")
    vlkit.save_model(llama, tmp_path / "llama")
    cfg = load_config("neva-tiny", [f"model.mm_cfg.llm.from_pretrained={tmp_path / 'llama'}"]).model
    model, notes = build_neva_model(cfg)
    assert torch.equal(model.llm.lm_head.weight, llama.llm.lm_head.weight)
    assert model.vision_tower.tower.pos_embed.std() > 0 and len(notes) >= 1


def test_declared_tower_must_match_the_checkpoint(parts):
    _, _, root = parts
    with pytest.raises(ValueError, match=r"vision_encoder\.hidden_size=64, but the tower at .*clip has hidden_size=48"):
        build_neva_model(config(root, "model.mm_cfg.vision_encoder.hidden_size=64"))


def test_missing_and_unreadable_checkpoints_say_what_to_do(tmp_path):
    cfg = load_config("neva-tiny", ["model.mm_cfg.vision_encoder.from_pretrained=someone/not-cached-here"]).model
    with pytest.raises(FileNotFoundError, match="huggingface-cli download someone/not-cached-here"):
        build_neva_model(cfg)
    nemo = tmp_path / "llama-2-13b-chat-tp8.nemo"
    nemo.write_bytes(b"tar")
    cfg = load_config("neva-tiny", [f"model.mm_cfg.llm.from_pretrained={nemo}"]).model
    with pytest.raises(ModelFormatError, match=r"llama-2-13b-chat-tp8\.nemo: not a NeMo checkpoint"):
        build_neva_model(cfg)


def test_stage2_starts_from_the_stage1_projector(tmp_path):
    torch.manual_seed(2)
    stage1, _ = build_neva_model(load_config("neva-tiny", ["model.mm_cfg.llm.freeze=true"]).model)
    state = trainable_state_dict(stage1)
    assert sorted(state) == ["projector.0.bias", "projector.0.weight", "projector.2.bias", "projector.2.weight"]
    # A trainer's checkpoints folder (latest names the newest complete one), holding the projector alone.
    CheckpointManager(tmp_path / "checkpoints").save(10, stage1, None, model_keys=set(state))
    cfg = load_config("neva-tiny", [f"model.mm_cfg.pretrain_mm_mlp_adapter={tmp_path / 'checkpoints'}"]).model
    stage2, notes = build_neva_model(cfg)
    assert torch.equal(stage2.projector[2].weight, stage1.projector[2].weight)
    assert any("projector from" in n for n in notes)
    # LLaVA's own mm_projector.bin (a pickle of plain tensors, read with weights_only).
    llava = {f"model.mm_projector.{k.removeprefix('projector.')}": t.clone() for k, t in state.items()}
    torch.save(llava, tmp_path / "mm_projector.bin")
    load_adapter(stage2, tmp_path)
    assert torch.equal(stage2.projector[0].bias, stage1.projector[0].bias)
    linear = vlkit.create_model("neva-tiny", **{"mm_cfg.mm_mlp_adapter_type": "linear"})
    with pytest.raises(
        ValueError, match=r"mm_projector\.bin: does not fit the model: unknown tensors \['projector\.2\.bias'"
    ):
        load_adapter(linear, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"no projector weights for \['projector\.0\.bias'"):
        torch.save({"model.mm_projector.weight": torch.zeros(64, 64)}, tmp_path / "bare.bin")
        load_adapter(linear, tmp_path / "bare.bin")


def test_load_model_recognises_a_hugging_face_llama_directory(parts):
    from vlkit.interop.native import detect_format
    from vlkit.models import LlamaForCausalLM

    _, llama, root = parts
    assert detect_format(root / "llama")[0] == "hf_llama"
    model = vlkit.load_model(root / "llama").eval()
    assert isinstance(model, LlamaForCausalLM)
    ids = torch.tensor([[1, 7, 9, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama(ids).logits, rtol=0, atol=1e-5)
