"""ClipEncoder: the model's own normalised features, batched, from any path vlkit.load_model reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlkit
from vlkit.serve.encoder import ClipEncoder, NotAClipModel

TEXTS = ["a red circle", "a photo of a blue square on a striped background", "", "a green star", "yellow"]


def _images() -> list[Image.Image]:
    # Odd sizes and modes: the encoder must go through the model's own eval transform (resize, crop, RGB).
    return [Image.new("RGB", (40, 30), "red"), Image.new("L", (32, 32), 200),
            Image.new("RGBA", (50, 64), (0, 0, 255, 128)), Image.new("RGB", (32, 32), "green")]  # fmt: skip


@pytest.fixture(scope="module")
def encoder(clip_run) -> ClipEncoder:
    return ClipEncoder.load(clip_run, device="cpu", batch_size=2)  # batches of 2: the batching is exercised


def test_encoder_equals_the_models_own_normalised_features(encoder, clip_run):
    reference = vlkit.load_model(_latest(clip_run)).eval()  # a separately loaded copy
    text_cfg = reference.config.text
    tokenizer = vlkit.get_tokenizer(text_cfg.tokenizer, text_cfg.encoder_seq_length)
    transform = vlkit.get_transform(reference, train=False)
    with torch.no_grad():
        texts = F.normalize(reference.encode_text(tokenizer(TEXTS)).float(), dim=-1)
        images = F.normalize(reference.encode_image(torch.stack([transform(i) for i in _images()])).float(), dim=-1)
    got_texts, got_images = encoder.embed_texts(TEXTS), encoder.embed_images(_images())
    assert got_texts.shape == (len(TEXTS), encoder.dim) and got_texts.dtype == torch.float32
    assert got_images.shape == (4, encoder.dim) and got_images.device.type == "cpu"
    torch.testing.assert_close(got_texts, texts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_images, images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_images.norm(dim=-1), torch.ones(4))


def _latest(run) -> str:
    from vlkit.interop.native import resolve_model_path

    return resolve_model_path(str(run))


def test_encoder_names_the_model_and_its_scale(encoder, clip_run):
    assert encoder.model_id == "clip-tiny-shapes"  # the run directory's name, not the step_N checkpoint's
    assert encoder.dim == encoder.embed_texts(["x"]).shape[1]
    with torch.no_grad():
        assert encoder.logit_scale == pytest.approx(float(encoder.model.scale()))
    assert encoder.embed_texts([]).shape == (0, encoder.dim)


def test_a_classifier_is_not_a_clip_model(classifier_run):
    with pytest.raises(NotAClipModel, match=r"vit-tiny-shapes.*vit_classifier model, not a CLIP model"):
        ClipEncoder.load(classifier_run, device="cpu")
