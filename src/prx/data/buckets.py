"""Aspect-ratio buckets: image shapes with about the same token count as a square of the stage
resolution, for aspect ratios from 1:2 to 2:1 (as in the reference). Every batch comes from one
bucket, so every micro-batch has one shape; each image is resized to cover its bucket and
centre-cropped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def tokens(self, patch: int) -> int:
        return (self.height // patch) * (self.width // patch)


def make_buckets(resolution: int, patch: int, min_aspect: float = 0.5, max_aspect: float = 2.0) -> list[Bucket]:
    """Shapes (multiples of ``patch``) whose token count is closest to (resolution/patch)², for
    aspect ratios width/height in [min_aspect, max_aspect], sorted from tallest to widest."""
    if resolution % patch:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch}")
    target = (resolution // patch) ** 2
    buckets = set()
    low = max(1, math.ceil(math.sqrt(target * min_aspect)))
    high = math.floor(math.sqrt(target / min_aspect)) if min_aspect > 0 else target
    for h in range(low, high + 1):
        w = max(1, round(target / h))
        if min_aspect <= w / h <= max_aspect:
            buckets.add(Bucket(h * patch, w * patch))
    return sorted(buckets, key=lambda b: b.aspect)


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> int:
    """Index of the bucket with the nearest aspect ratio (in log space)."""
    return nearest_bucket(width / height, buckets)


def resize_and_crop_box(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The size to resize to (covering the bucket, aspect kept) and the centred crop box in it."""
    scale = max(bucket.width / width, bucket.height / height)
    new_w, new_h = max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))
    left, top = (new_w - bucket.width) // 2, (new_h - bucket.height) // 2
    return (new_w, new_h), (left, top, left + bucket.width, top + bucket.height)


def nearest_bucket(aspect: float, buckets: list[Bucket]) -> int:
    """Index of the bucket whose aspect ratio (width / height) is nearest to ``aspect`` in log space."""
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i].aspect) - math.log(aspect)))


def bucket_indices(widths, heights, buckets: list[Bucket]):
    """:func:`assign_bucket` for arrays of image sizes (numpy), as the loader plans with it."""
    log_aspects = np.log([b.aspect for b in buckets])
    sample_aspects = np.log(np.asarray(widths) / np.maximum(np.asarray(heights), 1))
    return np.abs(sample_aspects[:, None] - log_aspects[None]).argmin(1)
