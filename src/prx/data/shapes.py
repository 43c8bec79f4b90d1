"""The shapes world: a procedural, seeded, captioned dataset (its exact judge: :mod:`prx.data.judge`).

Scenes hold 1 to 3 saturated objects (6 colours × 3 shapes) at 5 positions on a light neutral
background. Captions vary in phrasing; two-object scenes are sometimes described by a relation
("a red circle to the left of a blue square"). A fixed set of colour–shape–position combinations
is never rendered in training (the held-out split), to measure compositional generalisation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from prx.data.shards import write_shard

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (240, 215, 0),
    "green": (25, 170, 55),
    "blue": (30, 85, 225),
    "purple": (150, 45, 210),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_CENTERS = {
    "top left": (0.22, 0.22),
    "top right": (0.78, 0.22),
    "bottom left": (0.22, 0.78),
    "bottom right": (0.78, 0.78),
    "center": (0.5, 0.5),
}
SIZE_RANGE = (0.20, 0.26)  # object side / image side
JITTER = 0.02  # centre jitter, in image fractions
SUPERSAMPLE = 4  # rendered at 4× and box-downsampled: clean antialiased edges at any resolution

# Never rendered in training. Every colour, shape and position still appears in training,
# and with each other in other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "square", "bottom right"),
        ("orange", "triangle", "top left"),
        ("yellow", "circle", "top right"),
        ("green", "square", "center"),
        ("blue", "triangle", "bottom left"),
        ("purple", "circle", "bottom right"),
        ("red", "triangle", "top right"),
        ("orange", "circle", "center"),
        ("green", "circle", "top left"),
        ("purple", "square", "bottom left"),
    }
)
ALL_COMBOS = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
HELD_IN = [combo for combo in ALL_COMBOS if combo not in HELD_OUT]


# --------------------------------------------------------------------------------------------
# Scenes and captions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    position: str


@dataclass(frozen=True)
class Relation:
    """objects[first] is `kind` ("left of" | "right of" | "above" | "below") objects[second]."""

    kind: str
    first: int
    second: int


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for: the judge checks an image against this."""

    objects: tuple[ShapeObject, ...]
    relation: Relation | None = None  # when set, positions are implied by the relation only

    @property
    def combos(self) -> list[tuple[str, str, str]]:
        return [(o.color, o.shape, o.position) for o in self.objects]


@dataclass
class Scene:
    spec: SceneSpec
    caption: str
    background: int  # grey level of the neutral background
    boxes: list[tuple[float, float, float]] = field(default_factory=list)  # (cx, cy, size) per object


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(o: ShapeObject) -> str:
    return f"{_article(o.color)} {o.color} {o.shape}"


SINGLE_TEMPLATES = (
    "{noun} in the {pos}",
    "{noun} at the {pos}",
    "{noun}, {pos}",
    "{noun} in the {pos} of the image",
    "a picture of {noun} in the {pos}",
    "there is {noun} in the {pos}",
    "in the {pos}, {noun}",
    "{noun} placed in the {pos}",
)
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def canonical_caption(spec: SceneSpec) -> str:
    """The plain phrasing used for evaluation prompts."""
    if spec.relation is not None:
        r = spec.relation
        return f"{_noun(spec.objects[r.first])} {RELATION_WORDS[r.kind]} {_noun(spec.objects[r.second])}"
    parts = [f"{_noun(o)} in the {o.position}" for o in spec.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def varied_caption(spec: SceneSpec, rng: np.random.Generator) -> str:
    if spec.relation is not None or len(spec.objects) > 1:
        caption = canonical_caption(spec)
        if rng.random() < 0.3:
            count = len(spec.objects) if rng.random() < 0.5 else ["one", "two", "three"][len(spec.objects) - 1]
            caption = f"{count} shapes: {caption}"
        return caption
    o = spec.objects[0]
    template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
    return template.format(noun=_noun(o), pos=o.position)


def relation_between(a: str, b: str) -> str | None:
    """The relation of position a to position b when it is unambiguous (same row or column)."""
    (ax, ay), (bx, by) = POSITION_CENTERS[a], POSITION_CENTERS[b]
    if ay == by and ax != bx:
        return "left of" if ax < bx else "right of"
    if ax == bx and ay != by:
        return "above" if ay < by else "below"
    return None


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, size: float, scale: float):
    half = size * scale / 2
    x, y = cx * scale, cy * scale
    if shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=color)
    elif shape == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=color)
    elif shape == "triangle":  # upright: apex at the top, flat base at the bottom
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=color)
    else:
        raise ValueError(f"unknown shape '{shape}'")


def render(scene: Scene, resolution: int) -> np.ndarray:
    """uint8 (resolution, resolution, 3)."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj, (cx, cy, size) in zip(scene.spec.objects, scene.boxes):
        _draw_object(draw, obj.shape, COLORS[obj.color], cx, cy, size, big)
    return np.asarray(image.reduce(SUPERSAMPLE))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float in [-1, 1], (..., 3, H, W)."""
    t = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


class ShapesWorld:
    """Deterministic stream of captioned scenes: scene ``i`` depends only on (seed, i).

    ``split="train"`` never renders a held-out colour–shape–position combination.
    """

    def __init__(self, resolution: int = 64, seed: int = 0, split: str = "train",
                 object_count_weights: tuple[float, ...] | list[float] = (0.6, 0.3, 0.1)):
        if split not in ("train", "all"):
            raise ValueError("split must be 'train' or 'all'")
        self.resolution = resolution
        self.seed = seed
        self.split = split
        weights = np.asarray(object_count_weights, dtype=np.float64)
        self.count_probs = weights / weights.sum()

    def _random_object(self, rng: np.random.Generator, position: str) -> ShapeObject:
        while True:
            obj = ShapeObject(
                color=list(COLORS)[rng.integers(len(COLORS))], shape=SHAPES[rng.integers(len(SHAPES))],
                position=position,
            )
            if self.split == "all" or (obj.color, obj.shape, obj.position) not in HELD_OUT:
                return obj

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        count = 1 + rng.choice(len(self.count_probs), p=self.count_probs)
        positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:count]]
        objects = tuple(self._random_object(rng, p) for p in positions)
        relation = None
        if count == 2 and rng.random() < 0.5:
            kind = relation_between(positions[0], positions[1])
            if kind is not None:
                relation = Relation(kind, 0, 1)
        spec = SceneSpec(objects, relation)
        return make_scene(spec, rng, caption=varied_caption(spec, rng))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_tensor(render(scene, self.resolution)), scene.caption



def make_scene(spec: SceneSpec, rng: np.random.Generator, caption: str | None = None) -> Scene:
    """Place the spec's objects with random size and jitter on a random light-grey background."""
    boxes = []
    for obj in spec.objects:
        cx, cy = POSITION_CENTERS[obj.position]
        boxes.append(
            (cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER), rng.uniform(*SIZE_RANGE))
        )
    background = int(rng.integers(225, 246))
    return Scene(spec, caption if caption is not None else canonical_caption(spec), background, boxes)


# --------------------------------------------------------------------------------------------
# Evaluation prompt sets
# --------------------------------------------------------------------------------------------


def single_specs(combos) -> list[SceneSpec]:
    return [SceneSpec((ShapeObject(c, s, p),)) for c, s, p in combos]


def multi_specs(count: int, n: int, seed: int = 1234) -> list[SceneSpec]:
    """n held-in scenes with `count` objects; two-object scenes alternate positional and relational captions."""
    rng = np.random.default_rng([seed, count])
    world = ShapesWorld(split="train")
    specs = []
    while len(specs) < n:
        positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:count]]
        objects = tuple(world._random_object(rng, p) for p in positions)
        relation = None
        if count == 2 and len(specs) % 2 == 1:
            kind = relation_between(positions[0], positions[1])
            if kind is None:
                continue
            relation = Relation(kind, 0, 1)
        specs.append(SceneSpec(objects, relation))
    return specs


LAYOUTS = ("diagonal", "same row or column", "with the centre", "relational")


def layout_of(spec: SceneSpec) -> str | None:
    """How a two-object prompt places its objects (None for other counts): opposite corners
    ("diagonal"), two corners sharing a row or column, a corner and the centre, or only a relation
    ("to the left of", ...). Diagonal pairs are the hardest to bind: a position word read on its own
    ("top", "left") fits the two empty corners as well."""
    if len(spec.objects) != 2:
        return None
    if spec.relation is not None:
        return "relational"
    a, b = (o.position for o in spec.objects)
    if "center" in (a, b):
        return "with the centre"
    (ay, ax), (by, bx) = a.split(), b.split()
    return "same row or column" if ay == by or ax == bx else "diagonal"


def eval_prompt_sets(repeats_held_in: int = 2, repeats_held_out: int = 6, n_two: int = 64, n_three: int = 32):
    """name → list of specs. Repeats are sampled with different seeds."""
    return {
        "single_held_in": single_specs(HELD_IN) * repeats_held_in,
        "single_held_out": single_specs(sorted(HELD_OUT)) * repeats_held_out,
        "two_objects": multi_specs(2, n_two),
        "three_objects": multi_specs(3, n_three),
    }


def write_shards(out_dir, count: int, resolution: int = 64, seed: int = 0, split: str = "train",
                 object_count_weights=(0.6, 0.3, 0.1), per_shard: int = 1000) -> list:
    """The shapes world as prx shards (PNG images, a ``caption`` column), so the demo, the tests
    and real data share one loader."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(resolution, seed, split, object_count_weights)
    paths = []
    for shard, start in enumerate(range(0, count, per_shard)):
        rows = []
        for i in range(start, min(count, start + per_shard)):
            scene = world.scene(i)
            buffer = io.BytesIO()
            Image.fromarray(render(scene, resolution)).save(buffer, format="PNG")
            rows.append({"id": f"shapes-{seed}-{i}", "image": buffer.getvalue(), "width": resolution,
                         "height": resolution, "format": "PNG", "source": f"shapes seed {seed}",
                         "caption": scene.caption})
        path = out / f"shapes-{shard:05d}.parquet"
        write_shard(path, rows, ["caption"])
        paths.append(path)
    return paths
