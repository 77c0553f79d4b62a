"""One image loader for every runtime, and the Qwen2.5-VL resize rule with the DFJ training limits.

Every runtime receives the same RGB PIL image, already resized by `fit_to_grid` to the size the
Qwen2.5-VL rule gives (multiples of 28 within the judge's pixel limits), with PIL's bicubic filter
as the DFJ training pipeline did (ms-swift -> qwen_vl_utils.fetch_image). Each runtime's own
preprocessor then finds nothing to resize and only normalises, so transformers, ONNX Runtime and
llama.cpp see the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

# DFJ training limits (ms-swift MAX_PIXELS / MIN_PIXELS).
MIN_PIXELS = 3136
MAX_PIXELS = 1003520
PATCH_FACTOR = 28  # patch 14 x spatial merge 2

# Pillow's decompression-bomb guard, made strict: over this many pixels is an error, not a warning.
MAX_DECODED_PIXELS = 89_478_485

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image]


@dataclass(frozen=True)
class PixelLimits:
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"bad pixel limits: min {self.min_pixels}, max {self.max_pixels}")


def load_image(source: ImageInput) -> Image.Image:
    """A path, bytes or PIL image -> RGB PIL image, EXIF orientation applied.

    Raises ValueError naming the problem for anything that is not a readable, sane image.
    """
    return read_image(source)[0]


def read_image(source: ImageInput) -> tuple[Image.Image, str]:
    """`load_image`, and the digest of the image as read: `sha256:<hex>` of the file's bytes (a path or
    bytes, hashed as decoded: one read), or `pixels-sha256:<hex>` of a PIL image's mode, size and pixels."""
    if isinstance(source, Image.Image):
        image = source
        name = "PIL image"
        digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode() + image.tobytes())
        return _to_rgb(image, name), "pixels-sha256:" + digest.hexdigest()
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ValueError("image bytes are empty")
        data, name = bytes(source), "image bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"image file not found: {path}")
        if not path.is_file():
            raise ValueError(f"image path is not a file: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"image file is empty: {path}")
        data, name = path.read_bytes(), str(path)
    else:
        raise ValueError(f"an image must be a path, bytes or a PIL image, not {type(source).__name__}")
    return _to_rgb(_open(io.BytesIO(data), name), name), "sha256:" + hashlib.sha256(data).hexdigest()


def _open(stream: io.BytesIO, name: str) -> Image.Image:
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_DECODED_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{name}: image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not a readable image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"{name}: corrupt or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if getattr(image, "is_animated", False):
        image.seek(0)  # first frame of an animation
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name}: image has no pixels")
    if image.width * image.height > MAX_DECODED_PIXELS:
        raise ValueError(f"{name}: image too large ({image.width}x{image.height})")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the image; orientation is then as stored
        pass
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip to white.
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    elif mode == "F":
        import numpy as np

        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray(np.clip(values, 0, 255).astype("uint8"), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as transformers' convert_to_rgb does.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def smart_resize(
    height: int, width: int, limits: PixelLimits = PixelLimits(), factor: int = PATCH_FACTOR
) -> tuple[int, int]:
    """The (height, width) Qwen2.5-VL resizes an image to: multiples of 28, pixels within limits.

    Same rule as the Qwen2-VL image processor; an aspect ratio over 200 is refused, as there.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > limits.max_pixels:
        beta = math.sqrt((height * width) / limits.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < limits.min_pixels:
        beta = math.sqrt(limits.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_to_grid(image: Image.Image, limits: PixelLimits = PixelLimits()) -> Image.Image:
    """`image` resized (bicubic) to its `smart_resize` size; returned as is when it already has it."""
    height, width = smart_resize(image.height, image.width, limits)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def check_image(image: Image.Image, limits: PixelLimits = PixelLimits()) -> Image.Image:
    """Refuse, with a clear error, an image the Qwen2.5-VL preprocessor cannot take."""
    smart_resize(image.height, image.width, limits)
    return image
