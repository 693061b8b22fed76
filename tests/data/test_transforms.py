"""vlkit.data.transforms: eval parity with open_clip and Hugging Face on photograph-like images; train augmentation."""

import functools
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vlkit.config.schema import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Config, ModelConfig, VisionConfig
from vlkit.data.images import to_rgb
from vlkit.data.transforms import center_crop_offsets, get_transform, resized_size

TOL = 2 / 255  # the acceptance bound, per pixel, before normalisation
# PIL sizes (width, height): portrait/landscape photos, odd margins, one-pixel-off-square, a 4:3 camera frame.
SIZES = [(427, 640), (640, 427), (333, 500), (500, 333), (225, 224), (224, 225), (800, 600)]


@functools.cache
def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photograph-like RGB: smooth shading, sharp-edged regions and sensor noise, through a JPEG round trip."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    img[((x // 29 + y // 41) % 2) == 0] *= 0.55  # hard edges everywhere, so a one-pixel shift shows
    img[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 30)
    img += rng.normal(0, 10, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def open_clip_eval():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.image_transform(224, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def hf_processors(do_normalize: bool) -> list:
    transformers = pytest.importorskip("transformers")
    kwargs = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_normalize=do_normalize)
    processors = [transformers.CLIPImageProcessor(**kwargs)]
    try:  # transformers >= 5 keeps the original PIL/numpy processor under this name
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        pass
    else:
        processors.append(CLIPImageProcessorPil(**kwargs))
    return processors


def hf_pixels(processor, img: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))


@pytest.fixture(scope="module")
def hf_raw():
    return hf_processors(do_normalize=False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


OURS_OPENAI = get_transform(VisionConfig(), train=False, normalize=False)
OURS_HF = get_transform(VisionConfig(), train=False, normalize=False, crop_style="hf")


# ------------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_matches_open_clip(size, open_clip_eval):
    img = photo(*size)
    assert max_diff(OURS_OPENAI(img), open_clip_eval(img)) <= TOL  # measured: 0 (same PIL resize, same crop)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eval_matches_hugging_face(size, hf_raw):
    img = photo(*size)
    ours = OURS_HF(img)
    for processor in hf_raw:
        # measured: 0 against the PIL processor, 1/255 against the torchvision one (tensor vs PIL bicubic)
        assert max_diff(ours, hf_pixels(processor, img)) <= TOL, type(processor).__name__


def test_normalised_output_matches_references(open_clip_eval):
    open_clip = pytest.importorskip("open_clip")
    img = photo(427, 640)
    std = min(OPENAI_CLIP_STD)
    reference = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert max_diff(get_transform(VisionConfig(), False)(img), reference(img)) <= TOL / std
    for processor in hf_processors(do_normalize=True):
        assert max_diff(get_transform(VisionConfig(), False, crop_style="hf")(img), hf_pixels(processor, img)) <= (
            TOL / std
        )


@functools.cache
def mode_images() -> dict[str, Image.Image]:
    base = photo(333, 500, seed=3)
    rgba = base.convert("RGBA")
    alpha = np.zeros((500, 333), np.uint8)
    alpha[:, 100:] = 255
    alpha[:, 200:] = 90
    rgba.putalpha(Image.fromarray(alpha))
    sixteen = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257 + 100).astype(np.uint16))
    return {
        "L": base.convert("L"),
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": base.convert("P", palette=Image.Palette.ADAPTIVE),
        "CMYK": base.convert("CMYK"),
        "I;16": sixteen,
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16"])
def test_modes_match_references(mode, hf_raw, open_clip_eval):
    img = mode_images()[mode]
    assert img.mode == mode
    # Hugging Face composites alpha on white too, so it gets the raw image; PIL's 16-bit conversion clips, so for
    # 16-bit both references get our RGB conversion. open_clip drops alpha and converts after resizing: it gets
    # the raw image only where that cannot matter.
    hf_input = to_rgb(img) if mode == "I;16" else img
    for processor in hf_raw:
        assert max_diff(OURS_HF(img), hf_pixels(processor, hf_input)) <= TOL, type(processor).__name__
    open_clip_input = img if mode == "L" else to_rgb(img)
    assert max_diff(OURS_OPENAI(img), open_clip_eval(open_clip_input)) <= TOL


def test_crop_styles_differ_by_one_pixel_on_odd_margins():
    portrait, odd = photo(640, 427), photo(333, 500)
    # 640x427 -> 335x224: margin 111, openai starts the crop at round(55.5) = 56, hf at 55.
    assert max_diff(OURS_OPENAI(portrait), OURS_HF(portrait)) > 10 * TOL
    assert torch.equal(OURS_OPENAI(portrait)[:, :, :-1], OURS_HF(portrait)[:, :, 1:])
    assert torch.equal(OURS_OPENAI(odd), OURS_HF(odd))  # 333x500 -> 224x336: margin 112, both start at 56


def test_resize_and_crop_arithmetic():
    assert resized_size(640, 427, 224, 224) == (335, 224)  # int(224 * 640 / 427) = int(335.7)
    assert resized_size(427, 640, 224, 224, "hf") == (224, 335)
    assert resized_size(224, 225, 224, 224) == (224, 225)
    assert center_crop_offsets(224, 335, 224, 224, "openai") == (0, 56)
    assert center_crop_offsets(224, 335, 224, 224, "hf") == (0, 55)
    assert center_crop_offsets(224, 337, 224, 224, "openai") == (0, 56)  # round(56.5) = 56: half to even
    assert center_crop_offsets(225, 224, 224, 224, "openai") == (0, 0)
    # Non-square target: cover it, then crop.
    assert resized_size(500, 500, 224, 320) == (320, 320)
    assert resized_size(600, 800, 320, 224, "hf") == (320, 426)
    with pytest.raises(ValueError, match="crop style"):
        center_crop_offsets(1, 1, 1, 1, "timm")


@pytest.mark.parametrize("target", [(224, 320), (320, 224)], ids=str)
def test_non_square_eval_matches_open_clip(target):
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.image_transform(target, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    ours = get_transform(VisionConfig(img_h=target[0], img_w=target[1]), False, normalize=False)
    hf_style = get_transform(VisionConfig(img_h=target[0], img_w=target[1]), False, normalize=False, crop_style="hf")
    for size in [(427, 640), (800, 600), (300, 300)]:
        img = photo(*size)
        assert max_diff(ours(img), reference(img)) <= TOL
        assert hf_style(img).shape == (3, *target)


# ------------------------------------------------------------------------------------------------ config and output


def test_accepts_every_kind_of_model_description():
    from vlkit.models import create_model

    img = photo(100, 80)
    model = create_model("clip-tiny")
    for source in ["clip-tiny", Config(model=model.config), model.config, model.config.vision, model]:
        out = get_transform(source, train=False)(img)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    with pytest.raises(TypeError):
        get_transform(torch.nn.Linear(1, 1), train=False)


def test_mean_std_from_config():
    cfg = VisionConfig(img_h=64, img_w=48, image_mean=[0.5, 0.25, 0.0], image_std=[0.5, 0.5, 0.25])
    img = photo(120, 90)
    raw = get_transform(cfg, False, normalize=False)(img)
    normalised = get_transform(ModelConfig(vision=cfg), False)(img)
    expected = (raw - torch.tensor([0.5, 0.25, 0.0])[:, None, None]) / torch.tensor([0.5, 0.5, 0.25])[:, None, None]
    assert normalised.shape == (3, 64, 48)
    assert torch.allclose(normalised, expected, atol=1e-5)
    default = get_transform(VisionConfig(), False)(img)
    assert torch.allclose(default, (OURS_OPENAI(img) - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None])
                          / torch.tensor(OPENAI_CLIP_STD)[:, None, None], atol=1e-5)  # fmt: skip


def test_crop_style_and_interpolation_read_from_the_config():
    img = photo(640, 427)
    hf_cfg = types.SimpleNamespace(img_h=224, img_w=224, crop_style="hf")
    assert torch.equal(get_transform(hf_cfg, False, normalize=False)(img), OURS_HF(img))
    bilinear = types.SimpleNamespace(img_h=224, img_w=224, resize_interpolation="bilinear")
    assert not torch.equal(get_transform(bilinear, False, normalize=False)(img), OURS_OPENAI(img))
    assert torch.equal(get_transform(hf_cfg, False, normalize=False, crop_style="openai")(img), OURS_OPENAI(img))


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="crop style"):
        get_transform(VisionConfig(), False, crop_style="center")
    with pytest.raises(ValueError, match="interpolation"):
        get_transform(VisionConfig(), False, interpolation="lanczos")
    with pytest.raises(ValueError, match="num_channels"):
        get_transform(VisionConfig(num_channels=1), False)


def test_any_mode_and_tensor_input():
    for mode in ["RGBA", "LA", "P", "CMYK", "I;16", "F", "1", "YCbCr"]:
        out = get_transform(VisionConfig(img_h=32, img_w=32), True)(Image.new(mode, (50, 40)))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    tensor = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    assert get_transform(VisionConfig(img_h=32, img_w=32), False)(tensor).shape == (3, 32, 32)


def test_exif_orientation_is_optional():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(80, 40).save(buf, "JPEG", exif=exif.tobytes())
    img = Image.open(io.BytesIO(buf.getvalue()))
    cfg = VisionConfig(img_h=40, img_w=80)  # the stored 80x40 fits exactly; rotated 40x80 must be cropped
    stored = get_transform(cfg, False, normalize=False)(img)
    rotated = get_transform(cfg, False, normalize=False, exif_transpose=True)(img)
    assert stored.shape == rotated.shape == (3, 40, 80)
    assert max_diff(stored, rotated) > 0.1


# ---------------------------------------------------------------------------------------------------------- training


def coordinate_image(size: int = 256) -> Image.Image:
    """Red = x and green = y, so a crop's pixels tell where it came from."""
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def test_train_crop_respects_scale_and_ratio():
    train = get_transform(VisionConfig(), train=True, normalize=False)
    img = coordinate_image()
    areas = []
    for seed in range(25):
        torch.manual_seed(seed)
        out = (train(img) * 255).round()
        # The crop spans source columns min(R)..max(R) and rows min(G)..max(G); resampling blurs each edge <= 1 px.
        width = (out[0].max() - out[0].min() + 1).item()
        height = (out[1].max() - out[1].min() + 1).item()
        area = width * height / 256**2
        assert 0.9 - 0.02 <= area <= 1.0, (seed, width, height)
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
        areas.append(area)
    assert min(areas) < 0.97 and max(areas) > 0.98  # really random, across the allowed range


def test_train_is_seeded_and_random():
    train = get_transform(VisionConfig(img_h=96, img_w=128), train=True)
    # Near-square on purpose: a 3:2 image admits no crop of >= 90% area within ratios 3/4..4/3, and then
    # RandomResizedCrop (torchvision's, as open_clip's) always falls back to the same center crop.
    img = photo(220, 200)
    torch.manual_seed(0)
    first = train(img)
    torch.manual_seed(0)
    assert torch.equal(first, train(img))
    outputs = [train(img) for _ in range(5)]
    assert first.shape == (3, 96, 128)
    assert any(not torch.equal(first, o) for o in outputs)


def test_random_resized_crop_params_cover_the_range_and_fall_back_to_the_centre():
    from torchvision.transforms.v2 import InterpolationMode

    from vlkit.data.transforms import RandomResizedCrop

    crop = RandomResizedCrop((32, 32), (0.08, 1.0), InterpolationMode.BILINEAR)
    torch.manual_seed(0)
    shares, ratios = [], []
    for _ in range(2000):
        top, left, h, w = crop.params(120, 160)
        assert 0 <= top <= 120 - h and 0 <= left <= 160 - w
        shares.append(h * w / (120 * 160))
        ratios.append(w / h)
    assert 0.07 < min(shares) < 0.12 and max(shares) > 0.9
    assert min(ratios) < 0.8 and max(ratios) > 1.25 and all(0.7 < r < 1.4 for r in ratios)
    # A 10 x 1000 strip: no draw fits, so the centre crop with the widest allowed ratio (4/3).
    assert crop.params(10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def test_tensor_input_is_never_modified():
    x = torch.rand(3, 32, 32)
    before = x.clone()
    out = get_transform(VisionConfig(img_h=32, img_w=32), train=False)(x)  # same size: no resize, no crop
    assert torch.equal(x, before) and not torch.equal(out, x)
