"""Image files: PNG grids with captions (no torchvision)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_png(image: np.ndarray, path: str | Path) -> None:
    Image.fromarray(np.asarray(image)).save(path)


def make_grid(images, captions: list[str] | None = None, ncol: int = 8, min_tile: int = 128,
              max_lines: int = 6) -> Image.Image:
    """uint8 images (B, H, W, 3), or a list of (H, W, 3) of different sizes (several aspect ratios),
    → one image: tiles upscaled (nearest, one scale for all) so the largest side is at least
    ``min_tile`` px, each centred in its cell, captions below (at most ``max_lines`` lines each)."""
    images = [np.asarray(image) for image in images]
    n = len(images)
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    wrapped = [textwrap.wrap(c, chars, max_lines=max_lines, placeholder=" …") for c in captions or []]
    lines = max((len(w) for w in wrapped), default=0)
    text_h = 11 * lines + (4 if lines else 0)
    pad = 2
    grid = Image.new("RGB", (ncol * (tw + pad) + pad, nrow * (th + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        ih, iw = image.shape[0] * scale, image.shape[1] * scale
        grid.paste(Image.fromarray(image).resize((iw, ih), Image.NEAREST), (x + (tw - iw) // 2, y + (th - ih) // 2))
        if captions:
            for j, line in enumerate(wrapped[i]):
                draw.text((x + 1, y + th + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    return grid


def save_grid(images, path: str | Path, captions: list[str] | None = None, ncol: int = 8) -> None:
    make_grid(images, captions, ncol).save(path)
