import torch

from vlkit.models import create_model
from vlkit.utils.flops import count_parameters, tower_flops


def test_vit_flops_match_the_matmul_count():
    """Forward FLOPs of a ViT = 2 * (tokens * per-token weights + attention matmuls + patch conv + head)."""
    model = create_model("vit-tiny", device="meta")
    v = model.config.vision
    t, w, f, layers = v.class_token_length + v.num_patches, v.hidden_size, v.ffn_size, v.num_layers
    per_layer = 2 * t * (3 * w * w + w * w + 2 * w * f) + 2 * 2 * t * t * w
    patch = 2 * v.num_patches * w * v.num_channels * v.patch_dim**2
    head = 2 * w * model.config.num_classes
    counts = tower_flops(model)["image"]
    assert counts.forward == layers * per_layer + patch + head
    # Backward costs two more matmuls per forward matmul, minus the input gradient of the first (pixels).
    assert 2.5 * counts.forward < counts.forward_backward <= 3 * counts.forward


def test_clip_has_image_and_text_flops():
    counts = tower_flops(create_model("clip-tiny", device="meta"))
    assert set(counts) == {"image", "text"} and counts["text"].forward > 0


def test_tied_parameters_counted_once():
    lin = torch.nn.Linear(4, 4, bias=False)
    seq = torch.nn.Sequential(lin, lin)
    assert count_parameters(seq) == 16


def test_clip_task_flops_fit_every_caption_length():
    """The CLIP task counts a step's FLOPs from three traces (c + a L + b L^2): exact at any caption length."""
    from vlkit.config import load_config
    from vlkit.parallel import DistInfo
    from vlkit.tasks.clip import CLIPTask

    cfg = load_config("clip-tiny", [])
    image, c, a, b = CLIPTask(cfg, DistInfo())._flop_coefficients()
    meta = create_model(cfg, device="meta")
    for length in (5, 40, 77):
        traced = tower_flops(meta, length)
        direct = traced["image"].forward_backward + traced["text"].forward_backward
        assert image + c + a * length + b * length**2 == direct
