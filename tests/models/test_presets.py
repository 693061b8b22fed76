"""Every preset builds on the meta device with the parameter counts of the specification's tables."""

import pytest

from vlkit.models import create_model
from vlkit.utils.flops import count_parameters

# preset: (vision, text) parameters, exact. These equal open_clip's towers of the same shape.
CLIP_COUNTS = {
    "clip-b32": (87_849_216, 63_428_096),
    "clip-b16": (86_192_640, 63_428_096),
    "clip-l14": (303_966_208, 123_650_304),
    "clip-h14": (632_076_800, 354_032_640),
    "clip-g14": (1_012_645_632, 354_032_640),
    "clip-bigg14": (1_844_907_264, 694_659_840),
    "clip-e14": (3_807_716_864, 773_369_600),
}
# The CLIP table's "Model size (M)" columns (vision, text), where consistent with the listed dimensions
# (docs/models.md explains the ones that are not: B/16 text, H/14 vision, G/14 text, e/14 both).
CLIP_DOC = {
    "clip-b32": (87.85, 63.43),
    "clip-b16": (86.19, None),
    "clip-l14": (303.97, 123.65),
    "clip-h14": (None, 354.03),
    "clip-g14": (1012.65, 354.03),
    "clip-bigg14": (1840, None),
}
# preset: backbone parameters (the ViT table counts backbones; the 1000-class head adds width * 1001).
VIT_COUNTS = {
    "vit-b16": 85_809_408,
    "vit-l16": 303_315_968,
    "vit-h16": 630_936_320,
    "vit-h14": 630_782_720,
    "vit-g14": 1_011_222_144,
    "vit-bigg14": 1_842_798_976,
}
VIT_DOC = {"vit-b16": 86, "vit-l16": 303, "vit-h16": 632, "vit-h14": 632, "vit-g14": 1011, "vit-bigg14": 1843}


@pytest.mark.parametrize("name", CLIP_COUNTS)
def test_clip_preset_parameter_counts(name):
    model = create_model(name, device="meta")
    vision, text = count_parameters(model.visual), count_parameters(model.text)
    assert (vision, text) == CLIP_COUNTS[name]
    assert count_parameters(model) == vision + text + 1  # + logit_scale
    doc_vision, doc_text = CLIP_DOC.get(name, (None, None))
    if doc_vision is not None:
        assert vision / 1e6 == pytest.approx(doc_vision, rel=3e-3)
    if doc_text is not None:
        assert text / 1e6 == pytest.approx(doc_text, rel=1e-4)


@pytest.mark.parametrize("name", VIT_COUNTS)
def test_vit_preset_parameter_counts(name):
    model = create_model(name, device="meta")
    backbone = count_parameters(model.backbone)
    assert backbone == VIT_COUNTS[name]
    assert count_parameters(model) == backbone + model.config.vision.hidden_size * 1000 + 1000
    # The table rounds to whole millions and sometimes includes the head: within 1%.
    assert backbone / 1e6 == pytest.approx(VIT_DOC[name], rel=1e-2)


@pytest.mark.parametrize("name, seq", [("vit-b16", 204), ("vit-h14", 264), ("vit-bigg14", 264)])
def test_vit_sequence_length_matches_table(name, seq):
    v = create_model(name, device="meta").config.vision
    assert v.class_token_length + v.num_patches == seq


def test_tiny_presets_are_small():
    assert count_parameters(create_model("vit-tiny", device="meta")) < 200_000
    clip = create_model("clip-tiny", device="meta")
    assert count_parameters(clip.visual) < 200_000
