"""Known Hub names resolve offline to their architectures (the public parameter counts), and local copies are found
in $VLKIT_MODELS or the Hugging Face cache layout; a missing one is one line naming where vlkit looked and the
download command (exit 2 through the CLI's UserError path)."""

from __future__ import annotations

import pytest

from vlkit.interop.hub import HUB, NotDownloadedError, hub_model_config, known_name, locate
from vlkit.models import create_model
from vlkit.utils.errors import UserError
from vlkit.utils.flops import count_parameters

# Parameter counts of the public checkpoints (transformers' num_parameters()).
PUBLIC = {
    "openai/clip-vit-base-patch32": 151_277_313,
    "openai/clip-vit-base-patch16": 149_620_737,
    "openai/clip-vit-large-patch14": 427_616_513,
    "openai/clip-vit-large-patch14-336": 427_944_193,
    "meta-llama/Llama-2-7b-chat-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-chat-hf": 13_015_864_320,
    "lmsys/vicuna-7b-v1.5": 6_738_415_616,
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_known_names_have_the_public_parameter_counts(name):
    model = create_model(hub_model_config(name), device="meta")
    assert count_parameters(model) == PUBLIC[name]


def test_every_entry_builds_and_llava_is_a_neva():
    for name in HUB:
        assert create_model(hub_model_config(name), device="meta") is not None
    cfg = hub_model_config("llava-hf/llava-1.5-13b-hf")
    assert cfg["arch"] == "neva" and cfg["vision"]["img_h"] == 336 and cfg["llm"]["hidden_size"] == 5120
    assert cfg["mm_cfg"]["mm_mlp_adapter_type"] == "mlp2x_gelu" and cfg["llm"]["vocab_size"] == 32064
    h14 = hub_model_config("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert (h14["vision"]["hidden_size"], h14["vision"]["num_layers"], h14["vision"]["activation"]) == (
        1280,
        32,
        "gelu",
    )
    assert known_name("OpenAI/CLIP-ViT-Large-Patch14") == "openai/clip-vit-large-patch14"


def test_local_copies_vlkit_models_then_the_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--openai--clip-vit-base-patch32"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert locate("openai/clip-vit-base-patch32", "k") == repo / "snapshots" / "abc123"
    mine = tmp_path / "models" / "openai" / "clip-vit-base-patch32"
    mine.mkdir(parents=True)
    assert locate("openai/clip-vit-base-patch32", "k") == mine  # $VLKIT_MODELS first
    assert locate(str(mine), "k") == mine  # a local path is itself


def test_missing_says_where_it_looked_and_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NotDownloadedError) as e:
        locate("openai/clip-vit-large-patch14", "model.mm_cfg.vision_encoder.from_pretrained", from_hf=True)
    message = str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError) and "\n" not in message
    assert str(tmp_path / "models" / "openai" / "clip-vit-large-patch14") in message
    assert "models--openai--clip-vit-large-patch14" in message
    assert "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir $VLKIT_MODELS/openai/clip-vit-large" \
        "-patch14`" in message  # fmt: skip
