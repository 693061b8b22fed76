"""Safe image decoding and conversion of any PIL mode to 8-bit RGB.

Every loader in vlkit (webdataset shards, CSV sources, ImageFolder) decodes through :func:`decode_image` and turns
the result into RGB through :func:`to_rgb`, so a bad sample fails the same way everywhere: with an
:class:`ImageDecodeError` whose ``reason`` is one of :data:`REASONS` and can be counted in a metrics dict.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlkit.utils.errors import UserError

# Machine-usable failure reasons (ImageDecodeError.reason); metrics dicts count skips under these names.
REASONS = ("empty", "unidentified", "truncated", "corrupt", "too_large", "unsupported", "unreadable")

# Pillow's own default for Image.MAX_IMAGE_PIXELS (about 89.5 megapixels: a 9459 x 9459 image).
DEFAULT_MAX_PIXELS = 89_478_485
MAX_ASPECT = 20  # long side / short side of an image served or indexed (panoramas are ~4-10)

# Formats decoded by default. Pillow identifies ~40 formats; some of them (EPS) shell out to Ghostscript on load and
# others are rarely more than attack surface for data downloaded from the web, so untrusted bytes only reach these.
SAFE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "AVIF", "QOI")

# Leading bytes of the common formats. Bytes that start like an allowed format but cannot be identified are corrupt;
# like a format not allowed here, unsupported; like nothing known, not an image at all (HTML saved under a .jpg key).
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

# 16-bit greyscale modes; PIL's own conversion to L clips everything above 255 to white.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes with an alpha band; premultiplied ones (La, RGBa) are un-premultiplied on the way to their plain twin.
_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "PA"}
_WHITE = (255, 255, 255)


class ImageDecodeError(UserError, ValueError):
    """An image that cannot be decoded or converted.

    Attributes:
        reason: one of :data:`REASONS`: ``empty`` (zero bytes), ``unidentified`` (not recognisable as an image),
            ``truncated`` (the data ends early), ``corrupt`` (broken data or header), ``too_large`` (more pixels
            than allowed: a possible decompression bomb), ``unsupported`` (a format not allowed by ``formats``, or
            a mode with no RGB conversion), ``unreadable`` (the file could not be read).
        key: the sample key or file path the caller passed, for the warning that names the bad sample.
        detail: the underlying error message.
    """

    def __init__(self, reason: str, key: str = "", detail: str = ""):
        self.reason = reason
        self.key = key
        self.detail = detail
        where = f"{key}: " if key else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        # DataLoader workers pickle exceptions to the main process; keep all three fields across that hop.
        return type(self), (self.reason, self.key, self.detail)


def _allowed_formats(formats: tuple[str, ...] | list[str]) -> list[str]:
    Image.init()  # registers every plugin, so availability (AVIF needs libavif) can be checked
    return [f for f in formats if f.upper() in Image.OPEN]


def _classify_unidentified(data: bytes, formats: tuple[str, ...] | list[str]) -> str:
    looks_like = "WEBP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None
    for signature, fmt in _SIGNATURES.items():
        if data.startswith(signature):
            looks_like = fmt
    if looks_like is None:
        return "unidentified"
    return "corrupt" if looks_like in {f.upper() for f in formats} else "unsupported"


def _classify_load_error(err: Exception) -> str:
    message = str(err).lower()
    if "truncat" in message:
        return "truncated"
    if "decompressed data too large" in message:  # PNG text/ICC chunks that inflate beyond Pillow's limit
        return "too_large"
    return "corrupt"


def decode_image(
    data: bytes | bytearray | memoryview,
    key: str = "",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] | list[str] = SAFE_FORMATS,
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded PIL image in its own mode (the first frame if animated).

    The pixel limit is checked from the header, before any pixel data is decompressed. Pillow's own check is
    silenced inside this call only (its warning would fire for every large image a caller chose to allow); Pillow
    still refuses images beyond twice ``PIL.Image.MAX_IMAGE_PIXELS`` on its own, which is reported as ``too_large``
    too. Truncation cannot be detected if the process set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.

    Args:
        data: the encoded bytes (JPEG, PNG, WebP, GIF, ...).
        key: a name for the sample (shard and key, or a path), carried by the error.
        max_pixels: the largest width x height accepted; None for no limit of ours.
        formats: the Pillow format names that may be decoded.

    Returns:
        The decoded image, pixels loaded; convert it with :func:`to_rgb`.

    Raises:
        ImageDecodeError: with ``reason`` ``empty``, ``unidentified``, ``truncated``, ``corrupt``, ``too_large`` or
            ``unsupported``.
    """
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty", key, "zero bytes")
    try:
        # catch_warnings restores the filters on exit; threads decoding meanwhile share the swap, which can only hide
        # this one warning from them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_allowed_formats(formats))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError("corrupt", key, f"declared size {width}x{height}")
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError("too_large", key, f"{width}x{height} is more than {max_pixels} pixels")
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("too_large", key, str(e)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            _classify_unidentified(data, formats), key, f"{len(data)} bytes starting {data[:8]!r}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        # Pillow's plugins signal broken input with any of these; none of them is a bug of the caller's.
        raise ImageDecodeError(_classify_load_error(e), key, f"{type(e).__name__}: {e}") from None
    except MemoryError:
        raise ImageDecodeError("too_large", key, "out of memory while decoding") from None
    return img


def aspect_problem(width: int, height: int) -> str | None:
    """Why an image's shape is refused where it is served or indexed, or None: its sides may differ at most
    :data:`MAX_ASPECT` times. A model's transform resizes the short side to its input size, so a 1 x 100 000 strip (a
    few hundred bytes of PNG, far under any pixel limit) would become a 224 x 22 400 000 image."""
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width}x{height}: one side is more than {MAX_ASPECT} times the other"
    return None


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] | list[str] = SAFE_FORMATS,
) -> Image.Image:
    """Read a file and decode it with :func:`decode_image`; the error's key is the path.

    Raises:
        ImageDecodeError: any reason of :func:`decode_image`, or ``unreadable`` when the file cannot be read.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageDecodeError("unreadable", str(path), f"{type(e).__name__}: {e}") from None
    return decode_image(data, str(path), max_pixels=max_pixels, formats=formats)


def _scale_16bit(img: Image.Image) -> Image.Image:
    # Rounded division by 257 maps 0..65535 onto 0..255 exactly (65535 / 257 = 255).
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def _scale_float(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float32)
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    # Float images saved from numpy or scientific tools hold 0..1; PIL's own convention is 0..255. A maximum of at
    # most 1 decides it: read on the 0..255 scale such an image would be black anyway.
    if values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.rint(values.clip(0, 255)).astype(np.uint8), mode="L")


def _composite_on(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in _ALPHA_MODES and img.mode != _ALPHA_MODES[img.mode]:
        img = img.convert(_ALPHA_MODES[img.mode])
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def to_rgb(
    img: Image.Image,
    *,
    exif_transpose: bool = False,
    background: tuple[int, int, int] = _WHITE,
    key: str = "",
) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, premultiplied modes, and palette / greyscale / RGB images with a ``transparency``
    entry) is composited on ``background`` (white), as Hugging Face's ``convert_to_rgb`` does; OpenAI's and
    open_clip's ``convert("RGB")`` instead drop alpha and show whatever colour transparent pixels store. 16-bit
    greyscale (``I;16*``, and ``I``, which Pillow's decoders use for 16-bit data) is scaled to 8 bits rather than
    clipped; float (``F``) images are read as 0..1 if their maximum is at most 1, else as 0..255. CMYK uses Pillow's
    profile-free conversion. An RGB image without transparency is returned as is (no copy).

    Args:
        img: the image.
        exif_transpose: rotate/flip by the EXIF orientation tag first. Off by default because neither OpenAI's
            CLIP nor open_clip does it, so pretrained checkpoints saw unrotated pixels.
        background: the colour transparent pixels become.
        key: a name for the sample, carried by the error.

    Returns:
        An image of mode ``RGB``.

    Raises:
        ImageDecodeError: ``unsupported`` for a mode Pillow cannot convert to RGB.
    """
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    has_transparency = "transparency" in img.info
    try:
        if mode == "RGB" and not has_transparency:
            return img
        if mode in _MODES_16BIT or mode == "I":
            return _scale_16bit(img).convert("RGB")
        if mode == "F":
            return _scale_float(img).convert("RGB")
        if mode in _ALPHA_MODES or has_transparency:
            return _composite_on(img, background)
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError("unsupported", key, f"mode {mode}: {e}") from None
