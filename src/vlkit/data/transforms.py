"""Image transforms (torchvision kernels, see :class:`ImageTransform`) with the preprocessing a model asks for.

Eval: resize so the image covers the target (the shortest side for a square target; bicubic, antialiased), center
crop, scale to [0, 1], normalise. Train: RandomResizedCrop (scale 0.9-1.0, bicubic) in place of resize + crop.
Everything starts by converting any PIL mode to RGB (:func:`vlkit.data.images.to_rgb`).

Classification training adds, in timm's order and all off by default: horizontal flip after the crop, a torchvision
augmentation policy (RandAugment, AutoAugment or TrivialAugment, see :func:`auto_augment_transform`) on the PIL
image, and random erasing on the normalised tensor.

Two eval crop styles exist because the reference implementations disagree by one pixel on some sizes:

- ``openai`` (default): OpenAI's CLIP and open_clip, i.e. torchvision ``Resize`` + ``CenterCrop``. The crop offset is
  ``round((size - crop) / 2)`` with Python's half-to-even rounding.
- ``hf``: Hugging Face ``CLIPImageProcessor``: the crop offset is ``(size - crop) // 2``.

Both resize through PIL for PIL inputs, so ``openai`` reproduces open_clip's pixels and ``hf`` those of
``CLIPImageProcessorPil`` (transformers' default ``CLIPImageProcessor`` resizes a tensor and differs by ~1/255).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vlkit.config.schema import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlkit.data.images import to_rgb

CROP_STYLES = ("openai", "hf")
INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}
TRAIN_SCALE = (0.9, 1.0)


def resized_size(height: int, width: int, target_h: int, target_w: int, crop_style: str = "openai") -> tuple[int, int]:
    """The (height, width) an image is resized to before the center crop: the aspect kept, the target covered.

    For a square target the shorter side becomes the target and the longer one is truncated
    (``int(target * long / short)``), as torchvision's ``Resize(int)`` and Hugging Face's
    ``get_resize_output_image_size`` both compute it. For a non-square target the ``openai`` style follows
    open_clip's ``ResizeKeepRatio``, which rounds; the ``hf`` style keeps truncating.
    """
    _check_style(crop_style)
    if crop_style == "openai" and target_h != target_w:
        ratio = min(height / target_h, width / target_w)
        return round(height / ratio), round(width / ratio)
    if height * target_w <= width * target_h:  # the height binds: scaling it to target_h covers target_w too
        return target_h, max(target_w, int(target_h * width / height))
    return max(target_h, int(target_w * height / width)), target_w


def center_crop_offsets(
    height: int, width: int, target_h: int, target_w: int, crop_style: str = "openai"
) -> tuple[int, int]:
    """The (top, left) corner of a centered ``target_h x target_w`` crop.

    The styles differ by one pixel when the margin is 3 modulo 4 (111: ``openai`` 56, ``hf`` 55), else agree.
    """
    _check_style(crop_style)
    if crop_style == "openai":
        # torchvision's rule; round() is half-to-even, which is why a margin of 113 gives 56 in both styles.
        return int(round((height - target_h) / 2.0)), int(round((width - target_w) / 2.0))
    return (height - target_h) // 2, (width - target_w) // 2


def _check_style(crop_style: str) -> None:
    if crop_style not in CROP_STYLES:
        raise ValueError(f"unknown crop style {crop_style!r}; choose from {', '.join(CROP_STYLES)}")


class ToRGB:
    """Any PIL mode to RGB (alpha composited on white, 16-bit scaled); tensors pass through unchanged."""

    def __init__(self, exif_transpose: bool = False):
        self.exif_transpose = exif_transpose

    def __call__(self, inpt: Any) -> Any:
        if isinstance(inpt, torch.Tensor):
            return inpt
        return to_rgb(inpt, exif_transpose=self.exif_transpose)


class ResizeCenterCrop:
    """Resize keeping the aspect until ``size`` is covered, then crop its center, with a crop style's rounding."""

    def __init__(
        self,
        size: tuple[int, int],
        crop_style: str = "openai",
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC,
    ):
        _check_style(crop_style)
        self.size = (int(size[0]), int(size[1]))
        self.crop_style = crop_style
        self.interpolation = interpolation

    def __call__(self, inpt: Any) -> Any:
        height, width = F.get_size(inpt)
        target_h, target_w = self.size
        if (height, width) == (target_h, target_w):
            return inpt
        new_h, new_w = resized_size(height, width, target_h, target_w, self.crop_style)
        if (new_h, new_w) != (height, width):
            inpt = F.resize(inpt, [new_h, new_w], interpolation=self.interpolation, antialias=True)
        top, left = center_crop_offsets(new_h, new_w, target_h, target_w, self.crop_style)
        return F.crop(inpt, top, left, target_h, target_w)


class RandomResizedCrop:
    """torchvision's RandomResizedCrop: the same crop distribution from torch's RNG, without its per-call overhead.

    A crop covers a uniform share of the area in ``scale`` with a log-uniform aspect ratio in ``ratio`` and a uniform
    position; after 10 draws that do not fit, the centre crop of the ratio clamped into ``ratio``.
    """

    def __init__(
        self,
        size: tuple[int, int],
        scale: tuple[float, float],
        interpolation: v2.InterpolationMode,
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ):
        self.size = [int(size[0]), int(size[1])]
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.interpolation = interpolation

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width)."""
        area = height * width
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4).tolist()  # one RNG call per draw
            target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u_ratio * (self.log_ratio[1] - self.log_ratio[0]))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        in_ratio = width / height
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if in_ratio < lo:
            w, h = width, round(width / lo)
        elif in_ratio > hi:
            h, w = height, round(height * hi)
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, inpt: Any) -> Any:
        top, left, h, w = self.params(*F.get_size(inpt))
        return F.resized_crop(inpt, top, left, h, w, self.size, interpolation=self.interpolation, antialias=True)


class RandomHorizontalFlip:
    def __init__(self, p: float):
        self.p = float(p)

    def __call__(self, inpt: Any) -> Any:
        return F.horizontal_flip(inpt) if torch.rand(1).item() < self.p else inpt


class ImageTransform:
    """A PIL image (any mode) or image tensor to a plain float32 ``[3, H, W]`` tensor: geometric steps on the image,
    then one conversion (``/ 255``, then ``(x - mean) / std``: torchvision's arithmetic, so the same floats), then
    tensor steps (random erasing).

    Why not ``v2.Compose``: every v2 transform flattens and rebuilds its input as a pytree, ~150 us a step; at CLIP's
    small image sizes the six steps cost more than decoding the JPEG, and a 2-core machine spent half its time there.
    """

    def __init__(
        self,
        image_steps: list[Callable],
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        tensor_steps: tuple[Callable, ...] = (),
    ):
        self.image_steps = list(image_steps)
        self.tensor_steps = list(tensor_steps)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Any) -> torch.Tensor:
        for step in self.image_steps:
            img = step(img)
        if isinstance(img, torch.Tensor):
            x = img.as_subclass(torch.Tensor)
            # copy=True: the in-place steps below must never write into the caller's tensor
            x = x.to(torch.float32).mul_(1.0 / 255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        else:
            x = F.pil_to_tensor(img).to(torch.float32).mul_(1.0 / 255)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        for step in self.tensor_steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        steps = ", ".join(type(s).__name__ for s in (*self.image_steps, *self.tensor_steps))
        return f"ImageTransform([{steps}], normalize={self.mean is not None})"


AUTO_AUGMENT_POLICIES = {"imagenet": "IMAGENET", "cifar10": "CIFAR10", "svhn": "SVHN"}


def auto_augment_transform(spec: str, fill: tuple[int, ...] | None = None) -> v2.Transform:
    """A torchvision augmentation policy from its name (the ``data.auto_augment`` key).

    ``rand`` (RandAugment, 2 ops at magnitude 9 of 30), ``rand-m<M>-n<N>`` (either part optional, e.g. ``rand-m7``),
    ``auto`` / ``auto-imagenet`` / ``auto-cifar10`` / ``auto-svhn`` (AutoAugment with that policy; ``auto`` is
    ImageNet's), ``trivial`` (TrivialAugmentWide). ``fill`` paints the area that rotations and shears uncover.

    Raises:
        ValueError: an unknown name or a malformed ``rand-...`` part, naming the key.
    """
    parts = spec.strip().lower().split("-")
    head, rest = parts[0], parts[1:]
    fill_arg = list(fill) if fill is not None else None
    if head == "rand":
        ops, magnitude = 2, 9
        for part in rest:
            if len(part) > 1 and part[0] in "mn" and part[1:].isdigit():
                value = int(part[1:])
                if part[0] == "m":
                    magnitude = value
                else:
                    ops = value
            else:
                raise ValueError(f"data.auto_augment={spec!r}: cannot read {part!r} (expected m<magnitude> or n<ops>)")
        if not 0 <= magnitude <= 30 or ops < 1:
            raise ValueError(f"data.auto_augment={spec!r}: magnitude must be in 0..30 and ops >= 1")
        return v2.RandAugment(num_ops=ops, magnitude=magnitude, num_magnitude_bins=31, fill=fill_arg)
    if head == "auto" and len(rest) <= 1:
        policy = rest[0] if rest else "imagenet"
        if policy in AUTO_AUGMENT_POLICIES:
            return v2.AutoAugment(getattr(v2.AutoAugmentPolicy, AUTO_AUGMENT_POLICIES[policy]), fill=fill_arg)
    if head == "trivial" and not rest:
        return v2.TrivialAugmentWide(fill=fill_arg)
    raise ValueError(
        f"data.auto_augment={spec!r} is not a known policy "
        "(rand, rand-m<M>-n<N>, auto, auto-imagenet, auto-cifar10, auto-svhn, trivial)"
    )


def vision_config(model_or_config: Any) -> Any:
    """The vision config (``img_h``, ``img_w``, ``mean``, ``std``, ...) of a model, config or preset name.

    Accepts a vlkit model (also wrapped by DDP or ``torch.compile``), a ``Config``, a ``ModelConfig``, a
    ``VisionConfig``, or a preset name / YAML path.
    """
    obj = model_or_config
    if isinstance(obj, (str, os.PathLike)):
        from vlkit.config import load_config  # only needed for names; keeps the import of this module light

        obj = load_config(obj).model
    obj = getattr(obj, "_orig_mod", obj)  # torch.compile
    if isinstance(obj, torch.nn.Module):
        obj = getattr(obj, "module", obj)  # DistributedDataParallel
        if getattr(obj, "config", None) is None:
            raise TypeError(f"{type(obj).__name__} carries no .config to read the image preprocessing from")
        obj = obj.config
    if hasattr(obj, "model") and not hasattr(obj, "img_h"):  # the whole Config tree
        obj = obj.model
    if hasattr(obj, "vision") and not hasattr(obj, "img_h"):  # a ModelConfig
        obj = obj.vision
    if not (hasattr(obj, "img_h") and hasattr(obj, "img_w")):
        raise TypeError(f"cannot find img_h / img_w in a {type(model_or_config).__name__}")
    return obj


def get_transform(
    model_or_config: Any,
    train: bool,
    *,
    normalize: bool = True,
    crop_style: str | None = None,
    interpolation: str | None = None,
    exif_transpose: bool = False,
    scale: tuple[float, float] | None = TRAIN_SCALE,
    hflip: float = 0.0,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
) -> Callable[[Any], torch.Tensor]:
    """The preprocessing of a model: a callable from a PIL image (any mode) to a float tensor ``[3, img_h, img_w]``.

    Args:
        model_or_config: a vlkit model, ``Config``, ``ModelConfig``, ``VisionConfig`` or preset name; its vision
            config gives ``img_h``, ``img_w``, ``mean`` and ``std`` (OpenAI CLIP's by default) and, when present,
            ``crop_style`` and ``resize_interpolation``.
        train: RandomResizedCrop augmentation instead of the deterministic resize + center crop.
        normalize: False skips the mean/std normalisation and returns pixels in [0, 1] (for comparisons).
        crop_style: ``openai`` or ``hf`` (see the module docstring); None: the config's, else ``openai``.
        interpolation: ``bicubic`` or ``bilinear``; None: the config's, else ``bicubic``.
        exif_transpose: apply the EXIF orientation first (off: OpenAI and open_clip do not).
        scale: RandomResizedCrop's range of the crop's share of the image area (train only); None: no random crop,
            the eval resize + centre crop (the other train augmentations still apply).
        hflip: probability of a horizontal flip (train only).
        auto_augment: a torchvision policy name for :func:`auto_augment_transform` (train only).
        random_erasing: probability of erasing a random box with per-pixel normal noise after normalisation
            (torchvision's RandomErasing, ``value="random"``; train only).

    Returns:
        An :class:`ImageTransform`; its output is a plain ``torch.Tensor`` (float32, CHW).

    Raises:
        ValueError: an unknown crop style or interpolation, or a config with ``num_channels`` other than 3.
        ImageDecodeError: (when called) for an image mode with no RGB conversion.
    """
    cfg = vision_config(model_or_config)
    channels = getattr(cfg, "num_channels", 3)
    if channels != 3:
        raise ValueError(f"model.vision.num_channels={channels}: the image transforms produce RGB (3 channels)")
    size = (int(cfg.img_h), int(cfg.img_w))
    crop_style = crop_style or getattr(cfg, "crop_style", None) or "openai"
    _check_style(crop_style)
    interpolation = interpolation or getattr(cfg, "resize_interpolation", None) or "bicubic"
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]

    mean = getattr(cfg, "mean", None) or getattr(cfg, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(cfg, "std", None) or getattr(cfg, "image_std", None) or OPENAI_CLIP_STD
    steps: list[Callable] = [ToRGB(exif_transpose=exif_transpose)]
    if train and scale is not None:
        steps.append(RandomResizedCrop(size, scale, mode))
    else:
        steps.append(ResizeCenterCrop(size, crop_style=crop_style, interpolation=mode))
    if train:
        if hflip > 0:
            steps.append(RandomHorizontalFlip(hflip))
        if auto_augment:
            # Uncovered areas get the mean colour, which normalises to zero (timm does the same).
            steps.append(auto_augment_transform(auto_augment, fill=tuple(round(255 * m) for m in mean)))
    erasing = (v2.RandomErasing(p=random_erasing, value="random"),) if train and random_erasing > 0 else ()
    return ImageTransform(steps, tuple(mean) if normalize else None, tuple(std) if normalize else None, erasing)
