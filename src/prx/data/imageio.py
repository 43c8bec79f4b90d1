"""Decoding images safely: every way an image file can be odd either becomes a plain 8-bit RGB
image or a :class:`BadImage` with a short reason that the converter and the loader count.

- EXIF orientation is applied (a phone photo stored sideways comes out upright);
- CMYK, grayscale, palette and 16-bit images are converted to 8-bit RGB;
- transparency is composited on white (transparent pixels carry no colour of their own);
- truncated or corrupt files, zero-size images and decompression bombs are rejected.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 1024 px training image needs nothing near this; a malicious file claiming more is refused
# before its pixels are allocated.
MAX_PIXELS = 16384 * 16384
FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}
EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is a short stable label for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise BadImage("too many pixels", f"{image.width}x{image.height}")
            return image
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression bomb", str(e)[:80]) from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Exception as e:  # PIL raises many types for broken headers
        raise BadImage("corrupt header", type(e).__name__) from None


def probe(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, format) as displayed (EXIF rotation applied), reading only the header."""
    image = _open(data, max_pixels)
    if image.format not in FORMATS:
        raise BadImage("unsupported format", str(image.format))
    width, height = image.size
    if width == 0 or height == 0:
        raise BadImage("zero size")
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        orientation = 1
    if orientation in (5, 6, 7, 8):  # rotated by 90° or 270°
        width, height = height, width
    return width, height, image.format


def decode(data: bytes, max_pixels: int = MAX_PIXELS, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode to an upright 8-bit RGB PIL image.

    ``at_least`` (width, height, upright) lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling) when the result still covers that size: a 1024² photo for a 512² bucket.
    """
    image = _open(data, max_pixels)
    if image.width == 0 or image.height == 0:
        raise BadImage("zero size")
    if at_least is not None and image.format in ("JPEG", "MPO"):
        try:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        except Exception:
            turned = False
        image.draft("RGB", (at_least[1], at_least[0]) if turned else at_least)
    try:
        image.load()
    except OSError as e:  # truncated data
        raise BadImage("truncated", str(e)[:80]) from None
    except Exception as e:
        raise BadImage("corrupt data", type(e).__name__) from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block: keep the stored orientation
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grayscale → 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((array / top * 255).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB, HSV …

