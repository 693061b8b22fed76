"""NeVA model: splicing positions and label masks, start/end embeddings, loss, freezing, stage-1 state dicts,
projector shapes, cached generation, save/load."""

import pytest
import torch
import torch.nn.functional as F

import vlkit
from vlkit.models import create_model
from vlkit.models.neva import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    NevaModel,
    build_projector,
    freeze,
    load_trainable_state_dict,
    trainable_state_dict,
)
from vlkit.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = IMAGE_TOKEN_INDEX
P = 16  # neva-tiny: 32 px / patch 8 = 16 patches, class token dropped


def tiny(**overrides) -> NevaModel:
    torch.manual_seed(0)
    return create_model("neva-tiny", **overrides)


def batch():
    """Row 0: no padding; row 1: left-padded by two. Labels supervise some text tokens."""
    ids = torch.tensor([[1, 5, IMG, 7, 8], [0, 0, 9, IMG, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX, 4]])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, labels, images


def test_placeholder_id_is_the_data_modules():
    from vlkit.data import conversation

    assert conversation.IMAGE_TOKEN_INDEX == IMAGE_TOKEN_INDEX and conversation.IGNORE_INDEX == IGNORE_INDEX


@pytest.mark.parametrize("side", ["right", "left"])
def test_splice_positions_and_label_masks(side):
    model = tiny().eval()
    ids, mask, labels, images = batch()
    s = model.prepare_inputs_embeds(ids, images, mask, labels, padding_side=side)
    assert s.inputs_embeds.shape == (2, 4 + P, 64)
    # Row 1 keeps 2 text tokens + the image: 2 padding positions, at the end (right) or the start (left).
    row1, pads = (slice(0, 2 + P), [2 + P, 3 + P]) if side == "right" else (slice(2, 4 + P), [0, 1])
    want_ids = [[1, 5, *[IMG] * P, 7, 8], [9, *[IMG] * P, 4]]
    want_labels = [[IGNORE_INDEX, 5, *[IGNORE_INDEX] * P, 7, 8], [9, *[IGNORE_INDEX] * P, 4]]
    assert s.input_ids[0].tolist() == want_ids[0] and s.input_ids[1, row1].tolist() == want_ids[1]
    assert s.labels[0].tolist() == want_labels[0] and s.labels[1, row1].tolist() == want_labels[1]
    assert s.attention_mask[1].tolist() == [0 if i in pads else 1 for i in range(4 + P)]
    assert s.labels[1, pads].tolist() == [IGNORE_INDEX] * 2 and s.input_ids[1, pads].tolist() == [0, 0]
    assert s.attention_mask[0].all() and s.position_ids[0].tolist() == list(range(4 + P))
    assert s.position_ids[1, row1].tolist() == list(range(2 + P))
    with torch.no_grad():
        feats = model.encode_images(images)
        embed = model.llm.embed
        torch.testing.assert_close(s.inputs_embeds[0, 2 : 2 + P], feats[0])
        torch.testing.assert_close(s.inputs_embeds[0, [0, 1, 2 + P, 3 + P]], embed(torch.tensor([1, 5, 7, 8])))
        r = s.inputs_embeds[1, row1]
        torch.testing.assert_close(r[1 : 1 + P], feats[1])
        torch.testing.assert_close(r[[0, 1 + P]], embed(torch.tensor([9, 4])))
        assert s.inputs_embeds[1, pads].abs().sum() == 0


def test_start_end_embeddings_surround_the_image():
    model = tiny(**{"mm_cfg.use_im_start_end": True}).eval()
    assert model.num_image_tokens == P + 2
    ids, mask, labels, images = batch()
    s = model.prepare_inputs_embeds(ids, images, mask, labels)
    assert s.input_ids[0].tolist() == [1, 5, *[IMG] * (P + 2), 7, 8]
    assert s.labels[0].tolist() == [IGNORE_INDEX, 5, *[IGNORE_INDEX] * (P + 2), 7, 8]
    torch.testing.assert_close(s.inputs_embeds[0, 2], model.im_start.detach())
    torch.testing.assert_close(s.inputs_embeds[0, 3 + P], model.im_end.detach())
    torch.testing.assert_close(s.inputs_embeds[1, 1], model.im_start.detach())  # row 1: 9, start, ...
    with torch.no_grad():
        torch.testing.assert_close(s.inputs_embeds[0, 3 : 3 + P], model.projector(model.vision_tower(images)[:, 1:])[0])


def test_image_token_count_agrees_with_the_data_module():
    from vlkit.data import llava

    for start_end in (False, True):
        for drop in (0, 1):
            model = tiny(**{"mm_cfg.use_im_start_end": start_end, "mm_cfg.vision_encoder.class_token_length": drop})
            count = llava.image_token_count(model.config.vision, class_token_length=drop, use_im_start_end=start_end)
            assert model.num_image_tokens == count == P + (1 - drop) + 2 * start_end


def test_features_come_from_the_selected_hidden_state():
    """vision_select_layer=-2 of a 2-block tower is hidden_states[1]: the first block's output, before any norm."""
    model = tiny(**{"mm_cfg.vision_encoder.class_token_length": 0}).eval()
    full = VisionTransformer(model.config.vision).eval()
    full.load_state_dict(model.vision_tower.tower.state_dict(), strict=False)  # the cut tower lacks block 1 + norm
    images = batch()[3]
    with torch.no_grad():
        _, states = full.forward_intermediates(images)
        torch.testing.assert_close(model.vision_tower(images), states[0])
        assert model.encode_images(images).shape == (2, P + 1, 64)  # class token kept


def test_several_images_per_sample_and_samples_without():
    model = tiny().eval()
    ids = torch.tensor([[IMG, 3, IMG, 4], [5, 6, 7, 8]])
    stacks = [torch.randn(2, 3, 32, 32), None]
    s = model.prepare_inputs_embeds(ids, stacks)
    assert s.input_ids[0].tolist() == [*[IMG] * P, 3, *[IMG] * P, 4]
    assert s.input_ids[1, :4].tolist() == [5, 6, 7, 8] and s.attention_mask[1].sum() == 4
    with torch.no_grad():
        feats = model.encode_images(stacks[0])
    torch.testing.assert_close(s.inputs_embeds[0, P + 1 :].detach()[:P], feats[1])


def test_bad_image_inputs_name_the_sample():
    model = tiny()
    ids = torch.tensor([[1, IMG, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="placeholders .* but no images"):
        model(ids)
    with pytest.raises(ValueError, match="sample 0 has 2 <image> placeholders"):
        model(torch.tensor([[IMG, IMG, 2], [3, 4, 5]]), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="sample 1 has 0 <image> placeholders but 1 images"):
        model(ids, [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="batch=2"):
        model(ids, torch.randn(3, 3, 32, 32))


def test_loss_is_the_mean_cross_entropy_of_supervised_next_tokens():
    model = tiny().eval()
    ids, mask, labels, images = batch()
    out = model(ids, images, mask, labels)
    logits, spliced = out["logits"], out["labels"]
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), spliced[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss"], want)
    assert int(out["num_tokens"]) == 4  # 5, 7, 8 in row 0; 4 in row 1 (9 is its first token: no predecessor)
    # Right padding needs no mask: real positions' logits equal those of each row alone.
    with torch.no_grad():
        alone = model(ids[1:, 2:], images[1:])
    torch.testing.assert_close(logits[1, : 2 + P], alone[0])


def test_frozen_vision_has_no_grads_and_stays_in_eval_mode():
    model = tiny(**{"vision.hidden_dropout": 0.5, "llm.hidden_dropout": 0.1})
    assert model.frozen == ("vision_tower",)
    model.train()
    assert not model.vision_tower.training and model.llm.training and model.projector.training
    ids, mask, labels, images = batch()
    torch.testing.assert_close(model.encode_images(images), model.encode_images(images))  # no dropout: identical
    model(ids, images, mask, labels)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is not None for p in model.llm.parameters())


def test_unfrozen_vision_trains_and_frozen_llm_does_not():
    model = tiny(**{"vision.hidden_dropout": 0.5, "mm_cfg.vision_encoder.freeze": False, "mm_cfg.llm.freeze": True})
    assert model.frozen == ("llm",)
    model.train()
    assert model.vision_tower.training and not model.llm.training
    ids, mask, labels, images = batch()
    assert not torch.equal(model.encode_images(images), model.encode_images(images))  # dropout on
    model(ids, images, mask, labels)["loss"].backward()
    assert all(p.grad is not None for p in model.vision_tower.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    before = model.vision_tower.tower.patch_embed.proj.weight.detach().clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(before, model.vision_tower.tower.patch_embed.proj.weight)
    # freeze() with another config re-applies both ways.
    cfg = model.config.mm_cfg
    cfg.vision_encoder.freeze, cfg.llm.freeze = True, False
    assert freeze(model) == ("vision_tower",) and not model.vision_tower.training and model.llm.training
    assert all(p.requires_grad for p in model.llm.parameters())


def test_unused_images_keep_the_projector_in_the_graph():
    model = tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])  # text only, dummy images still passed (as batches carry them)
    model(ids, torch.randn(2, 3, 32, 32), labels=ids)["loss"].backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("start_end", [False, True])
def test_stage1_trainable_state_dict_holds_the_adapter_only(start_end):
    model = tiny(**{"mm_cfg.llm.freeze": True, "mm_cfg.use_im_start_end": start_end})
    state = trainable_state_dict(model)
    adapter = {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    assert set(state) == adapter | ({"im_start", "im_end"} if start_end else set())
    base = tiny(**{"mm_cfg.llm.freeze": True, "mm_cfg.use_im_start_end": start_end})
    torch.manual_seed(5)
    base.reset_adapter()
    assert not torch.equal(base.projector[0].weight, model.projector[0].weight)
    llm_before = base.llm.embed.weight.clone()
    assert load_trainable_state_dict(base, state) == sorted(state)
    assert torch.equal(base.projector[2].bias, model.projector[2].bias) and torch.equal(
        base.llm.embed.weight, llm_before
    )
    with pytest.raises(ValueError, match=r"stage1\.safetensors: .*unknown tensors \['projector\.9\.weight'\]"):
        load_trainable_state_dict(base, {"projector.9.weight": torch.zeros(1)}, "stage1.safetensors")
    with pytest.raises(ValueError, match=r"shapes projector\.0\.bias: \(3,\)"):
        load_trainable_state_dict(base, {"projector.0.bias": torch.zeros(3)})
    stage2 = tiny()  # vision frozen, LLM trains: projector + LLM
    assert {k.split(".")[0] for k in trainable_state_dict(stage2)} == {"projector", "llm"}


@pytest.mark.parametrize("kind, linears", [("linear", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4), ("mlp1x_gelu", 1)])
def test_projector_types(kind, linears):
    proj = build_projector(kind, 48, 80)
    layers = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in layers] == [(80, 48)] + [(80, 80)] * (linears - 1)
    assert sum(isinstance(m, torch.nn.GELU) for m in proj) == linears - 1
    assert proj(torch.randn(2, 5, 48)).shape == (2, 5, 80)
    model = tiny(**{"mm_cfg.mm_mlp_adapter_type": kind})
    assert model.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, P, 64)


@pytest.mark.parametrize("kind", ["mlp0x_gelu", "mlp2x_relu", "conv"])
def test_unknown_projector_type(kind):
    with pytest.raises(ValueError, match="mm_mlp_adapter_type"):
        build_projector(kind, 4, 4)


def test_cached_generation_equals_greedy_decoding_without_cache():
    model = tiny().eval()
    ids, mask, _, images = batch()
    out = model.generate(ids, images, mask, max_new_tokens=6, eos_token_ids=[])
    s = model.prepare_inputs_embeds(ids, images, mask, padding_side="left")
    embeds, att = s.inputs_embeds, s.attention_mask
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = model.llm(inputs_embeds=embeds, attention_mask=att)[:, -1].argmax(-1)
            want.append(nxt)
            embeds = torch.cat([embeds, model.llm.embed(nxt)[:, None]], 1)
            att = torch.cat([att, torch.ones(2, 1, dtype=att.dtype)], 1)
    assert out.tokens.tolist() == torch.stack(want, 1).tolist()


def test_text_only_calls_go_straight_to_the_llm():
    model = tiny().eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model.llm(ids))


def test_save_and_load_round_trip(tmp_path):
    model = tiny(**{"mm_cfg.use_im_start_end": True, "mm_cfg.mm_mlp_adapter_type": "mlp3x_gelu"}).eval()
    vlkit.save_model(model, tmp_path / "neva")
    loaded = vlkit.load_model(tmp_path / "neva").eval()
    assert isinstance(loaded, NevaModel) and loaded.frozen == model.frozen
    assert loaded.config.mm_cfg == model.config.mm_cfg
    ids, mask, _, images = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images, mask), model(ids, images, mask), rtol=0, atol=0)
