import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dfj.images import PixelLimits, load_image, smart_resize


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), "RGB")


def test_path_bytes_and_pil_give_the_same_pixels(rgb, tmp_path):
    path = tmp_path / "x.png"
    rgb.save(path)
    a, b, c = load_image(path), load_image(path.read_bytes()), load_image(rgb)
    assert a.mode == b.mode == c.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
    assert load_image(str(path)).size == (50, 30)


def test_exif_orientation_is_applied(rgb):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rgb.save(buffer, format="JPEG", exif=exif.tobytes())
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (30, 50)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert np.asarray(load_image(opaque))[0, 0].tolist() == [10, 20, 30]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([200, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(_png_bytes(palette)))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_grey_and_16_bit_become_rgb():
    assert load_image(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).mode == "RGB"
    assert load_image(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)
    sixteen = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert load_image(_png_bytes(sixteen)).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((3, 3), 32768, dtype=np.uint16))
    assert load_image(mid).getpixel((0, 0))[0] in (127, 128)


def test_animation_uses_the_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue()).getpixel((0, 0))[0] > 200


@pytest.mark.parametrize(
    "payload,problem",
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable image"),
        (None, "path, bytes or a PIL image"),
    ],
)
def test_unreadable_input_is_a_clear_error(payload, problem):
    with pytest.raises(ValueError, match=problem):
        load_image(payload)


def test_truncated_and_missing_files(rgb, tmp_path):
    data = _png_bytes(rgb)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_decompression_bomb_is_refused_without_decoding():
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    # Rewrite IHDR to claim 20000 x 20000 pixels (400 MP) and fix its CRC.
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", 20000, 20000)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    with pytest.raises(ValueError, match="too large"):
        load_image(bytes(data))


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    limits = PixelLimits()
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (28, 28), (1080, 1920), (4000, 3000), (100, 19000), (57, 83)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, limits) == reference(h, w, 28, limits.min_pixels, limits.max_pixels), (h, w)
        rh, rw = smart_resize(h, w, limits)
        assert rh % 28 == 0 and rw % 28 == 0 and rh * rw <= limits.max_pixels


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500)
