"""Image files: PNG grids with captions (no torchvision)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_png(image: np.ndarray, path: str | Path) -> None:
    Image.fromarray(np.asarray(image)).save(path)


def make_grid(images: np.ndarray, captions: list[str] | None = None, ncol: int = 8, min_tile: int = 128) -> Image.Image:
    """uint8 (B, H, W, 3) → one image, tiles upscaled (nearest) to at least ``min_tile`` px, captions below."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw = h * scale, w * scale
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    lines = max((len(textwrap.wrap(c, chars)) for c in captions), default=0) if captions else 0
    text_h = 11 * lines + (4 if lines else 0)
    pad = 2
    grid = Image.new("RGB", (ncol * (tw + pad) + pad, nrow * (th + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), pad + r * (th + text_h + pad)
        grid.paste(Image.fromarray(images[i]).resize((tw, th), Image.NEAREST), (x, y))
        if captions:
            for j, line in enumerate(textwrap.wrap(captions[i], chars)):
                draw.text((x + 1, y + th + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    return grid


def save_grid(images: np.ndarray, path: str | Path, captions: list[str] | None = None, ncol: int = 8) -> None:
    make_grid(images, captions, ncol).save(path)
