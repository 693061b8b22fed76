import math

import pytest
import torch

from vlkit.models import CLIPModel, ViTClassifier, create_model


def tiny_clip(**overrides):
    torch.manual_seed(0)
    return create_model("clip-tiny", **overrides)


def text_ids(batch=2, length=77, eot_at=(5, 9)):
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row, pos in enumerate(eot_at[:batch]):
        ids[row, 0] = 49406
        ids[row, 1:pos] = torch.randint(1, 49000, (pos - 1,))
        ids[row, pos] = 49407
    return ids


def test_clip_forward_contract():
    model = tiny_clip()
    pixels, ids = torch.randn(2, 3, 32, 32), text_ids()
    out = model(pixels, ids)
    assert out["image_features"].shape == out["text_features"].shape == (2, 64)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_image(pixels).norm(dim=-1).sub(1).abs().max() > 1e-3  # not normalised


def test_clip_backward_reaches_every_parameter():
    model = tiny_clip()
    out = model(torch.randn(3, 3, 32, 32), text_ids(3, eot_at=(3, 4, 5)))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # Rows of the token embedding that were not used get zero grads, which is fine; None means disconnected.
    assert no_grad == []


def test_logit_scale_is_clamped_at_100():
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_eot_pooling_ignores_tokens_after_end_of_text():
    model = tiny_clip().eval()
    ids = text_ids(1, eot_at=(6,))
    ids2 = ids.clone()
    ids2[0, 7:20] = 1234
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(ids2))
    assert model.text.eot_positions(ids).item() == 6


def test_first_pooling_and_bidirectional_text():
    model = tiny_clip(text__pooling="first", text__causal=False).eval()
    ids = text_ids(2)
    ids2 = ids.clone()
    ids2[0, 7:20] = 1234  # after end-of-text: masked out in the bidirectional tower
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(ids2))
    ids3 = ids.clone()
    ids3[0, 3] = 999  # before end-of-text: position 0 sees it when bidirectional
    assert not torch.allclose(model.encode_text(ids)[0], model.encode_text(ids3)[0])


def test_text_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="context length"):
        tiny_clip().encode_text(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("tokens, pool", [(0, True), (1, False), (3, False), (3, True)])
def test_vision_class_tokens_and_pooling(tokens, pool):
    model = create_model(
        "vit-tiny", vision__class_token_length=tokens, vision__global_average_pool=pool, vision__img_w=48
    )
    assert isinstance(model, ViTClassifier)
    logits = model(torch.randn(2, 3, 32, 48))
    assert logits.shape == (2, 10)
    feats = model.forward_features(torch.randn(2, 3, 32, 48))
    assert feats.shape == (2, tokens + 4 * 6, 64)


def test_forward_intermediates_returns_every_layer():
    model = tiny_clip().eval()
    pixels = torch.randn(2, 3, 32, 32)
    final, states = model.visual.forward_intermediates(pixels)
    assert len(states) == 2 and states[-1].shape == (2, 1 + 16, 64)
    torch.testing.assert_close(model.visual.norm(states[-1]), final)
    torch.testing.assert_close(final, model.visual.forward_features(pixels))


def test_grad_checkpointing_gives_identical_gradients():
    model = tiny_clip()
    pixels, ids = torch.randn(2, 3, 32, 32), text_ids()

    def grads():
        model.zero_grad()
        out = model(pixels, ids)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if n != "logit_scale"}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], msg=name)


def test_quick_gelu_changes_the_function():
    a, b = tiny_clip(), tiny_clip(vision__activation="quick_gelu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a.encode_image(x), b.encode_image(x))


def test_resolution_change_resamples_position_embeddings():
    base = create_model("vit-tiny", vision__class_token_length=2)
    big = create_model("vit-tiny", vision__class_token_length=2, vision__img_h=64, vision__img_w=64)
    big.load_state_dict(base.state_dict())
    assert big.backbone.pos_embed.shape == (2 + 64, 64)
    torch.testing.assert_close(big.backbone.pos_embed[:2], base.backbone.pos_embed[:2])
    # A constant position field stays constant at any resolution.
    with torch.no_grad():
        base.backbone.pos_embed[2:] = 0.5
    big.load_state_dict(base.state_dict())
    torch.testing.assert_close(big.backbone.pos_embed[2:], torch.full((64, 64), 0.5))


def test_run_time_resolution_change():
    model = create_model("vit-tiny").eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 10)


def test_dropout_is_off_in_eval():
    model = create_model("vit-tiny", vision__hidden_dropout=0.5, vision__drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))


def test_meta_device_build_and_init_scale():
    meta = create_model("clip-b16", device="meta")
    assert isinstance(meta, CLIPModel) and meta.logit_scale.is_meta
    model = tiny_clip()
    qkv = model.visual.transformer.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_no_weight_decay_names_exist():
    model = tiny_clip()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert "logit_scale" in model.no_weight_decay()
