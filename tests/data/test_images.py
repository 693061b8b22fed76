"""vlkit.data.images: every PIL mode to RGB (pixel values asserted), and decode_image's errors per reason."""

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vlkit.data.images import DEFAULT_MAX_PIXELS, REASONS, ImageDecodeError, decode_image, read_image, to_rgb


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but carries almost no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def noise_jpeg(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG", quality=90)


def rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------- mode conversion


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: its stored colour must not show
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    px = rgb(img)
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [10, 20, 30]
    assert px[0, 2].tolist() == [127, 127, 127]  # 255 * (1 - 128/255)


def test_rgba_png_round_trip_and_custom_background():
    img = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    img.putpixel((1, 0), (200, 100, 50, 255))
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.mode == "RGBA"
    assert np.asarray(to_rgb(decoded, background=(0, 0, 0)))[0].tolist() == [[0, 0, 0], [200, 100, 50]]


def test_la_and_premultiplied_la():
    la = Image.new("LA", (2, 1), (50, 0))
    la.putpixel((1, 0), (50, 255))
    assert rgb(la)[0].tolist() == [[255, 255, 255], [50, 50, 50]]
    premultiplied = Image.new("La", (1, 1), (100, 255))
    assert rgb(premultiplied)[0, 0].tolist() == [100, 100, 100]


def test_rgba_premultiplied():
    assert rgb(Image.new("RGBa", (1, 1), (10, 20, 30, 255)))[0, 0].tolist() == [10, 20, 30]
    assert rgb(Image.new("RGBa", (1, 1), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]


def palette_image() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    return img


def test_palette_without_transparency():
    assert rgb(palette_image())[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_palette_with_transparent_index_through_png():
    img = palette_image()
    decoded = decode_image(encode(img, "PNG", transparency=0))
    assert decoded.mode == "P" and "transparency" in decoded.info
    assert rgb(decoded)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_palette_with_per_entry_alpha():
    img = palette_image()
    img.info["transparency"] = bytes([0, 255])  # PNG tRNS for palettes: one alpha per entry
    assert rgb(img)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_rgb_with_transparent_colour_and_plain_rgb_untouched():
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (9, 9, 9))
    assert to_rgb(img) is img  # the common case costs nothing
    img.info["transparency"] = (1, 2, 3)
    assert rgb(img)[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_cmyk():
    img = Image.new("CMYK", (3, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 0))
    assert rgb(img)[0].tolist() == [[255, 255, 255], [0, 0, 0], [0, 255, 255]]


def test_cmyk_jpeg_decodes_to_its_colour():
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert decoded.mode == "CMYK"
    assert np.abs(rgb(decoded).astype(int) - [255, 0, 0]).max() <= 3  # JPEG is lossy


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_scaled_not_clipped(mode):
    values = np.array([[0, 128, 129, 257, 32768, 65535]], dtype=">u2" if mode.endswith("B") else np.uint16)
    img = Image.fromarray(values)
    assert img.mode == mode
    assert rgb(img)[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]
    assert np.asarray(img.convert("RGB"))[0, 3, 0] == 255  # what PIL alone does: everything above 255 is white


def test_16bit_png_round_trip():
    values = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    assert decoded.mode.startswith("I")
    expected = np.rint(values / 257.0).astype(np.uint8)
    out = rgb(decoded)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])


def test_32bit_int_read_as_16bit_range():
    img = Image.fromarray(np.array([[-5, 0, 65535, 70000]], dtype=np.int32))
    assert img.mode == "I"
    assert rgb(img)[0, :, 1].tolist() == [0, 0, 255, 255]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    bytescale = Image.fromarray(np.array([[0.0, 127.6, 300.0, np.nan]], dtype=np.float32))
    assert rgb(bytescale)[0, :, 0].tolist() == [0, 128, 255, 0]


def test_bilevel_grey_and_ycbcr():
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert rgb(bilevel)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    assert rgb(Image.new("L", (1, 1), 77))[0, 0].tolist() == [77, 77, 77]
    assert np.abs(rgb(Image.new("YCbCr", (1, 1), (128, 128, 128)))[0, 0].astype(int) - 128).max() <= 1


@pytest.mark.parametrize("mode", ["HSV", "LAB", "RGBX", "PA", "I;16L", "I;16N"])
def test_other_modes_become_rgb(mode):
    assert to_rgb(Image.new(mode, (2, 2))).mode == "RGB"


def test_unconvertible_mode_raises_unsupported(monkeypatch):
    img = Image.new("YCbCr", (1, 1))

    def refuse(*args, **kwargs):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(img, "convert", refuse)
    with pytest.raises(ImageDecodeError) as err:
        to_rgb(img, key="k")
    assert err.value.reason == "unsupported" and err.value.key == "k"


def test_exif_orientation_only_on_request():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(Image.new("RGB", (4, 2), (0, 128, 0)), "JPEG", exif=exif.tobytes()))
    assert to_rgb(decoded).size == (4, 2)  # OpenAI and open_clip ignore EXIF: so do we by default
    assert to_rgb(decoded, exif_transpose=True).size == (2, 4)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image(data, "anim.gif")
    assert getattr(decoded, "n_frames", 1) == 2
    assert rgb(decoded)[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------------------- decoding


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, "shard-0/key", **kwargs)
    assert err.value.key == "shard-0/key" and err.value.reason in REASONS
    return err.value.reason


def test_good_image_decodes_fully_from_any_buffer():
    data = noise_jpeg()
    for buffer in (data, bytearray(data), memoryview(data)):
        img = decode_image(buffer)
        assert img.size == (64, 64) and img.mode == "RGB"
    assert decode_image(data).im is not None  # pixels loaded, not just the header


def test_zero_bytes():
    assert reason_of(b"") == "empty"


def test_not_an_image():
    assert reason_of(b"<html>not found</html>") == "unidentified"


def test_corrupt_jpeg_header():
    assert reason_of(b"\xff\xd8\xff" + b"junk" * 100) == "corrupt"


def test_corrupt_jpeg_data():
    data = noise_jpeg()
    garbage = np.random.default_rng(1).integers(0, 256, len(data) - 300, dtype=np.uint8).tobytes()
    assert reason_of(data[:300] + garbage) == "corrupt"


def test_truncated_jpeg_and_png():
    data = noise_jpeg()
    assert reason_of(data[: len(data) // 2]) == "truncated"
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    assert reason_of(png[: len(png) // 2]) == "truncated"


def test_png_bad_checksum():
    png = bytearray(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG"))
    png[-20:-14] = b"\x00" * 6  # inside the IDAT payload: its CRC no longer matches
    assert reason_of(bytes(png)) in ("corrupt", "truncated")


def test_bomb_sized_png_rejected_from_its_header():
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reason_of(png_header_only(100_000, 100_000)) == "too_large"  # beyond PIL's own hard ceiling
        assert reason_of(png_header_only(10_000, 10_000)) == "too_large"  # between PIL's warning and error
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert (warnings.filters, Image.MAX_IMAGE_PIXELS) == (filters, limit)  # no global state left changed
    assert limit == DEFAULT_MAX_PIXELS


def test_pixel_limit_is_ours_to_set(monkeypatch):
    data = encode(Image.new("RGB", (40, 40)), "PNG")
    assert reason_of(data, max_pixels=40 * 40 - 1) == "too_large"
    assert decode_image(data, max_pixels=40 * 40).size == (40, 40)
    # A limit above PIL's global one is honoured without PIL's warning; twice PIL's limit stays PIL's hard ceiling.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, max_pixels=None).size == (40, 40)
    assert reason_of(encode(Image.new("RGB", (50, 50)), "PNG"), max_pixels=None) == "too_large"


def test_formats_restrict_what_is_decoded():
    assert reason_of(noise_jpeg(), formats=("PNG",)) == "unsupported"  # a JPEG, but JPEG is not allowed here
    assert reason_of(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == "unidentified"  # EPS is off


def test_error_fields_survive_pickling():
    err = ImageDecodeError("truncated", "shard-3/0042", "image file is truncated")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.key, back.detail) == ("truncated", "shard-3/0042", "image file is truncated")
    assert "shard-3/0042" in str(back) and "truncated" in str(back)


def test_read_image(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("L", (3, 2)), "PNG"))
    assert read_image(path).size == (3, 2)
    with pytest.raises(ImageDecodeError) as err:
        read_image(tmp_path / "missing.jpg")
    assert err.value.reason == "unreadable" and "missing.jpg" in err.value.key
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        read_image(tmp_path / "empty.jpg")
