"""LoRA layers: the base's output at init, only adapters trainable, merging equal to the adapted layer, target names
checked (in the config, with the nearest valid name, and when applied)."""

import pytest
import torch
from torch import nn

from vlkit.config import ConfigError, load_config
from vlkit.models import create_model
from vlkit.nn.lora import (
    LoRALinear,
    apply_lora,
    has_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    merge_lora_state_dict,
)


def test_a_wrapped_linear_is_the_base_at_init_and_keeps_its_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    weight, x = lin.weight, torch.randn(3, 8)
    before = lin(x)
    layer = LoRALinear.wrap(lin, rank=4, alpha=8, dropout=0.1)
    assert layer is lin and isinstance(layer, nn.Linear) and layer.weight is weight
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (6, 4) and layer.scaling == 2.0
    assert layer.lora_A.abs().sum() > 0 and not layer.lora_B.any()
    layer.eval()
    assert torch.equal(layer(x), before)


def test_merge_equals_the_adapted_layer_and_restores_a_plain_linear():
    torch.manual_seed(0)
    layer = LoRALinear.wrap(nn.Linear(8, 6), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    adapted = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    merge_lora(nn.Sequential(layer))
    assert type(layer) is nn.Linear and set(layer.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-6)
    merged = merge_lora_state_dict({f"l.{k}": v for k, v in state.items()}, {"l": 2.0})
    torch.testing.assert_close(merged["l.weight"], layer.weight, rtol=1e-6, atol=1e-7)
    assert set(merged) == {"l.weight", "l.bias"}


def test_apply_lora_to_the_neva_llm_keeps_its_logits_and_trains_adapters_only():
    torch.manual_seed(0)
    model = create_model("neva-tiny").eval()
    ids = torch.randint(0, 512, (2, 7))
    before = model.llm(ids)
    wrapped = apply_lora(model, ["qkv", "proj", "gate", "up", "down"], 4, 8.0, default_towers=("llm",))
    assert len(wrapped) == 2 * 5 and all(n.startswith("llm.transformer.blocks.") for n in wrapped)
    assert has_lora(model.llm) and not has_lora(model.vision_tower) and not has_lora(model.projector)
    mark_only_lora_trainable(model.llm)
    trainable = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable == {f"{n[len('llm.') :]}.lora_{x}" for n in wrapped for x in "AB"}
    assert torch.equal(model.llm(ids), before)
    # A tower prefix reaches another tower; the vision tower's MLP is a GELU one (fc1 / fc2). (The tower is cut
    # after vision_select_layer=-2: one block of two is left.)
    wrapped = apply_lora(model, ["vision_tower.fc1"], 2, 2.0, default_towers=("llm",))
    assert wrapped == ["vision_tower.tower.transformer.blocks.0.mlp.fc1"]
    assert len(lora_layers(model)) == 11
    with pytest.raises(ValueError, match="llm has no fc1 projection"):
        apply_lora(create_model("neva-tiny"), ["fc1"], 2, 2.0, default_towers=("llm",))


@pytest.mark.parametrize(
    "targets, message",
    [
        ("[q_proj]", "'q_proj' is not a projection of llm; did you mean 'qkv'?"),
        ("[o_proj,fc1]", "did you mean 'proj'?"),
        ("[fc1]", "'fc1' is not a projection of llm; did you mean 'gate'?"),
        ("[vison.qkv]", "no tower 'vison' in model.arch=neva; did you mean 'vision_tower.qkv'?"),
        (
            "[vision_tower.gate]",
            "'vision_tower.gate' is not a projection of vision_tower; did you mean 'vision_tower.fc1'?",
        ),
    ],
)
def test_unknown_targets_fail_at_load_with_the_nearest_name(targets, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_config("neva-tiny", ["model.peft.lora.rank=4", f"model.peft.lora.target_modules={targets}"])


def test_lora_config_checks():
    cfg = load_config("neva-tiny", ["model.peft.lora.rank=4", "model.peft.lora.target_modules=[qkv,vision_tower.fc2]"])
    assert cfg.model.peft.lora.target_modules == ["qkv", "vision_tower.fc2"]
    assert load_config("clip-tiny", ["model.peft.lora.rank=2", "model.peft.lora.target_modules=[qkv,text.fc1]"])
    with pytest.raises(ConfigError, match="model.peft.lora.dropout=1.5 must be in"):
        load_config("neva-tiny", ["model.peft.lora.rank=4", "model.peft.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match="LoRA adapts model.arch=neva"):
        load_config("llama-tiny", ["model.peft.lora.rank=4"])
    assert load_config("llama-tiny", ["model.peft.lora.rank=0"])  # off: nothing to check
    # The default targets are every attention and MLP projection of the towers a bare name applies to.
    from vlkit.config.validate import lora_targets

    assert lora_targets(load_config("neva-tiny", ["model.peft.lora.rank=4"]).model) == ["qkv", "proj", "gate", "up",
                                                                                        "down"]  # fmt: skip
    assert lora_targets(load_config("clip-tiny", ["model.peft.lora.rank=4"]).model) == ["qkv", "proj", "fc1", "fc2"]
    # A locked tower is not also adapted (LoRA would re-freeze its unlocked blocks, eval mode silence the dropout).
    with pytest.raises(ConfigError, match="adapts visual and model.lock_image=true locks it"):
        load_config("clip-tiny", ["model.peft.lora.rank=4", "model.lock_image=true"])
    assert load_config("clip-tiny", ["model.peft.lora.rank=4", "model.lock_image=true",
                                     "model.peft.lora.target_modules=[text.qkv]"])  # fmt: skip


def test_adapters_of_a_half_precision_base_train_in_fp32_and_merge_into_its_dtype():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear.wrap(base, rank=4, alpha=8)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)  # no autocast: the bf16 input meets fp32 adapters
    assert out.dtype == torch.bfloat16
    update = (x.float() @ layer.lora_A.T @ layer.lora_B.T) * 2
    expected = x.float() @ layer.weight.float().T + layer.bias.float() + update
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.weight.grad is not None  # (base frozen by the task)
    merged = merge_lora_state_dict({f"l.{k}": v.detach() for k, v in layer.state_dict().items()}, {"l": 2.0})
    assert merged["l.weight"].dtype == torch.bfloat16


def test_the_memory_check_counts_adapters_not_the_frozen_base():
    from vlkit.train.preflight import _freeze_as_the_task_will
    from vlkit.utils.memory import build_on_meta

    def trainable(overrides):
        cfg = load_config("clip-tiny", overrides)
        model = build_on_meta(lambda: create_model(cfg), cfg.model, prefix="model")
        _freeze_as_the_task_will(model, cfg)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    full, lora = trainable([]), trainable(["model.peft.lora.rank=4"])
    assert lora < full / 50  # adapters (and the logit scale), not the 3.4 M base


def test_the_clip_task_adapts_both_towers_and_keeps_the_logit_scale_trainable():
    from vlkit.parallel.dist import DistInfo
    from vlkit.tasks.clip import CLIPTask

    cfg = load_config("clip-tiny", ["model.peft.lora.rank=2", "model.peft.lora.target_modules=[qkv,visual.fc2]"])
    task = CLIPTask(cfg, DistInfo())
    torch.manual_seed(0)
    model = task.build_model()
    pixels, ids = torch.randn(2, 3, cfg.model.vision.img_h, cfg.model.vision.img_w), torch.randint(1, 100, (2, 77))
    with torch.no_grad():
        before = model.eval()(pixels, ids)
    task.prepare_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - {n for n in trainable if n.endswith((".lora_A", ".lora_B"))} == {"logit_scale"}
    assert {n.rsplit(".", 2)[-2] for n in trainable if n != "logit_scale"} == {"qkv", "fc2"}
    with torch.no_grad():
        after = model.eval()(pixels, ids)
    assert all(torch.equal(before[k], after[k]) for k in before)
