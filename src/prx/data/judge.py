"""The shapes world's exact judge, from pixels only, and the factors the world varies at random.

Saturated pixels are classified by hue (mixing a colour with the neutral background keeps its hue), connected
blobs are compared with ideal circle / square / triangle masks fitted to their bounding box, and a blob's
position comes from its centroid. :func:`scene_factors` measures what the world draws at random (object size,
centre offset, background grey), so a model's diversity can be compared with the world's own.
"""

from __future__ import annotations

import colorsys
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from prx.data.shapes import (
    COLORS,
    POSITION_CENTERS,
    SIZE_RANGE,
    SceneSpec,
    make_scene,
    render,
)

# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------

_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360 for name, rgb in COLORS.items()}
CHROMA_THRESHOLD = 70  # a pixel is "object" if max(RGB) − min(RGB) exceeds this (the background is neutral)
MIN_IOU = 0.6  # a blob that fits no ideal shape this well is not a recognisable shape
ASPECT_LIMITS = (0.6, 1.0 / 0.6)
CENTER_RADIUS = 0.14  # centroid within this of the middle (both axes) → "center"
RELATION_MARGIN = 0.15


@dataclass
class Blob:
    color: str
    shape: str | None  # None: matches no shape
    position: str
    cx: float
    cy: float
    area: int
    iou: float
    width: float = 0.0  # bounding box size and centre, in image fractions
    height: float = 0.0
    box_cx: float = 0.0
    box_cy: float = 0.0


def hue_degrees(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel hue in degrees and chroma (max − min) for uint8 RGB."""
    rgb = image.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    return hue, chroma


def _classify_hue(hue: np.ndarray) -> np.ndarray:
    names = list(_PALETTE_HUES)
    centers = np.array([_PALETTE_HUES[n] for n in names])
    dist = np.abs(hue[..., None] - centers)
    dist = np.minimum(dist, 360 - dist)
    return dist.argmin(-1)


def _shape_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a blob mask (cropped to its bounding box) with ideal shapes fitted to that box."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx, cy = w / 2, h / 2
    templates = {
        "circle": ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1.0,
        "square": np.ones_like(mask, dtype=bool),
        "triangle": np.abs(xs - cx) <= (w / 2) * (ys / h),
    }
    area = mask.sum()
    out = {}
    for name, tpl in templates.items():
        inter = np.logical_and(mask, tpl).sum()
        out[name] = float(inter / (area + tpl.sum() - inter))
    return out


def position_of(cx: float, cy: float) -> str:
    if abs(cx - 0.5) < CENTER_RADIUS and abs(cy - 0.5) < CENTER_RADIUS:
        return "center"
    return ("top" if cy < 0.5 else "bottom") + " " + ("left" if cx < 0.5 else "right")


def detect(image: np.ndarray) -> list[Blob]:
    """The objects in a uint8 (H, W, 3) image, largest first."""
    height, width = image.shape[:2]
    hue, chroma = hue_degrees(image)
    labels_by_color = _classify_hue(hue)
    saturated = chroma > CHROMA_THRESHOLD
    # The smallest real object is a triangle of side 0.2: half of (0.2·res)²; ignore specks under a quarter of it.
    min_area = 0.25 * 0.5 * (SIZE_RANGE[0] ** 2) * height * width
    blobs = []
    for ci, color in enumerate(_PALETTE_HUES):
        components, n = ndimage.label(saturated & (labels_by_color == ci))  # 4-connectivity
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components[box] == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            cy = (ys.mean() + box[0].start + 0.5) / height
            cx = (xs.mean() + box[1].start + 0.5) / width
            bh, bw = mask.shape
            ious = _shape_ious(mask)
            shape, iou = max(ious.items(), key=lambda kv: kv[1])
            aspect = bw / bh
            if iou < MIN_IOU or not (ASPECT_LIMITS[0] <= aspect <= ASPECT_LIMITS[1]):
                shape = None
            box_cx, box_cy = (box[1].start + bw / 2) / width, (box[0].start + bh / 2) / height
            blobs.append(Blob(color, shape, position_of(cx, cy), cx, cy, area, iou, bw / width, bh / height,
                              box_cx, box_cy))
    return sorted(blobs, key=lambda b: -b.area)


def _relation_holds(kind: str, a: Blob, b: Blob) -> bool:
    if kind == "left of":
        return a.cx + RELATION_MARGIN < b.cx
    if kind == "right of":
        return a.cx > b.cx + RELATION_MARGIN
    if kind == "above":
        return a.cy + RELATION_MARGIN < b.cy
    if kind == "below":
        return a.cy > b.cy + RELATION_MARGIN
    raise ValueError(kind)


@dataclass
class Verdict:
    color: float  # share of prompt objects whose colour is present
    shape: float  # ... present with that colour and shape
    position: float  # ... present with that colour at the right place (or the relation holds)
    count: bool  # as many objects as asked
    correct: bool  # one-to-one match of every object on all attributes, and the right count
    blobs: list[Blob]


def judge(image: np.ndarray, spec: SceneSpec) -> Verdict:
    """Does a uint8 (H, W, 3) image show exactly what ``spec`` asks for?"""
    blobs = detect(image)
    objs = spec.objects
    color_ok = shape_ok = position_ok = 0
    for i, o in enumerate(objs):
        same_color = [b for b in blobs if b.color == o.color]
        color_ok += bool(same_color)
        shape_ok += any(b.shape == o.shape for b in same_color)
        if spec.relation is None:
            position_ok += any(b.position == o.position for b in same_color)
        else:  # the relation decides position for both of its objects
            r = spec.relation
            a_spec, b_spec = objs[r.first], objs[r.second]
            position_ok += any(
                _relation_holds(r.kind, a, b)
                for a in blobs if a.color == a_spec.color
                for b in blobs if b.color == b_spec.color and b is not a
            )
    count = len(blobs) == len(objs)
    correct = False
    if count:
        for perm in itertools.permutations(blobs, len(objs)):
            if not all(b.color == o.color and b.shape == o.shape for b, o in zip(perm, objs)):
                continue
            if spec.relation is None:
                ok = all(b.position == o.position for b, o in zip(perm, objs))
            else:
                ok = _relation_holds(spec.relation.kind, perm[spec.relation.first], perm[spec.relation.second])
            if ok:
                correct = True
                break
    n = len(objs)
    return Verdict(color_ok / n, shape_ok / n, position_ok / n, count, correct, blobs)


# --------------------------------------------------------------------------------------------
# Diversity: how much the factors the world varies at random vary in generated images
# --------------------------------------------------------------------------------------------

FACTORS = ("size", "dx", "dy", "background")  # object side, centre offset from its position, background grey


def scene_factors(image: np.ndarray, spec: SceneSpec) -> list[tuple[float, float, float, float]]:
    """One (size, dx, dy, background) row per prompt object found with its colour and shape at its
    place: size is the bounding box side (image fractions), (dx, dy) the centroid's offset from the
    position's centre, background the median grey of the unsaturated pixels (0–255). The world draws
    size ~ U(0.20, 0.26), offsets ~ U(−0.02, 0.02), background ~ U{225..245} per scene."""
    blobs = detect(image)
    _, chroma = hue_degrees(image)
    plain = image[chroma <= CHROMA_THRESHOLD / 2]
    background = float(np.median(plain.mean(-1))) if len(plain) else float("nan")
    rows = []
    for o in spec.objects:
        found = [b for b in blobs if b.color == o.color and b.shape == o.shape and b.position == o.position]
        if found:
            b = found[0]  # the largest
            cx, cy = POSITION_CENTERS[o.position]
            rows.append((float(np.sqrt(b.width * b.height)), b.box_cx - cx, b.box_cy - cy, background))
    return rows


def world_factors(specs: list[SceneSpec], resolution: int, repeats: int = 4, seed: int = 0) -> np.ndarray:
    """The factors of the world's own renders of ``specs`` (each ``repeats`` times), measured by
    :func:`scene_factors` like generated images, so the measurement's own error cancels out."""
    rows = []
    for i, spec in enumerate(specs):
        for r in range(repeats):
            scene = make_scene(spec, np.random.default_rng([seed, i, r]))
            rows += scene_factors(render(scene, resolution), spec)
    return np.array(rows, dtype=np.float64).reshape(-1, len(FACTORS))


