import numpy as np
import pytest

from prx.data.judge import judge
from prx.data.shapes import (
    COLORS,
    HELD_IN,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SceneSpec,
    ShapeObject,
    ShapesWorld,
    eval_prompt_sets,
    make_scene,
    render,
)


def test_deterministic_per_index_and_seed():
    a, b = ShapesWorld(48, seed=1), ShapesWorld(48, seed=1)
    for i in (0, 5, 99):
        assert a.scene(i).caption == b.scene(i).caption
        assert np.array_equal(render(a.scene(i), 48), render(b.scene(i), 48))
    other = ShapesWorld(48, seed=2)
    assert [other.scene(i).caption for i in range(10)] != [a.scene(i).caption for i in range(10)]


def test_training_split_never_renders_held_out_but_covers_every_attribute():
    world = ShapesWorld(48, seed=0, split="train")
    seen = set()
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(3000):
        spec = world.scene(i).spec
        counts[len(spec.objects)] += 1
        seen.update(spec.combos)
    assert not seen & HELD_OUT
    assert seen == set(HELD_IN)
    assert {c for c, _, _ in seen} == set(COLORS) and {s for _, s, _ in seen} == set(SHAPES)
    assert {p for _, _, p in seen} == set(POSITIONS)
    assert all(counts[k] > 0 for k in counts)
    for colour, shape, position in HELD_OUT:  # each held-out combo's pairs still appear in training
        assert any(c == colour and s == shape for c, s, _ in seen)
        assert any(c == colour and p == position for c, _, p in seen)
        assert any(s == shape and p == position for _, s, p in seen)


def test_captions_are_varied_and_name_the_objects():
    world = ShapesWorld(48, seed=0)
    captions = [world.scene(i).caption for i in range(400)]
    singles = [c for c, i in zip(captions, range(400)) if len(world.scene(i).spec.objects) == 1]
    templates = {c.replace(o.color, "C").replace(o.shape, "S").replace(o.position, "P")
                 for c, o in ((world.scene(i).caption, world.scene(i).spec.objects[0]) for i in range(400)
                              if len(world.scene(i).spec.objects) == 1)}
    assert len(templates) >= 6
    assert any(" left of " in c or " above " in c or " below " in c or " right of " in c for c in captions)
    assert all(any(col in c for col in COLORS) for c in singles)


@pytest.mark.parametrize("resolution", [48, 64, 128])
def test_judge_accepts_ground_truth(resolution):
    world = ShapesWorld(resolution, seed=7, split="all", object_count_weights=(1, 1, 1))
    verdicts = [judge(render(s, resolution), s.spec) for s in (world.scene(i) for i in range(300))]
    assert np.mean([v.correct for v in verdicts]) >= 0.99


def test_judge_rejects_wrong_images():
    rng = np.random.default_rng(0)
    spec = SceneSpec((ShapeObject("red", "circle", "top left"),))
    image = render(make_scene(spec, rng), 64)
    assert judge(image, spec).correct
    for wrong in (ShapeObject("blue", "circle", "top left"), ShapeObject("red", "square", "top left"),
                  ShapeObject("red", "triangle", "top left"), ShapeObject("red", "circle", "bottom right"),
                  ShapeObject("red", "circle", "center")):
        assert not judge(image, SceneSpec((wrong,))).correct, wrong
    blank = np.full((64, 64, 3), 235, dtype=np.uint8)
    v = judge(blank, spec)
    assert not v.correct and v.color == 0 and not v.count
    two = SceneSpec((ShapeObject("red", "circle", "top left"), ShapeObject("blue", "square", "bottom right")))
    v = judge(image, two)  # one object where two were asked for
    assert not v.correct and not v.count and v.color == 0.5
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not judge(noise, spec).correct


def test_relations_are_judged():
    from prx.data.shapes import Relation

    rng = np.random.default_rng(0)
    placed = SceneSpec((ShapeObject("red", "circle", "top left"), ShapeObject("blue", "square", "top right")))
    image = render(make_scene(placed, rng), 64)
    objects = placed.objects
    assert judge(image, SceneSpec(objects, Relation("left of", 0, 1))).correct
    assert judge(image, SceneSpec(objects, Relation("right of", 1, 0))).correct
    assert not judge(image, SceneSpec(objects, Relation("right of", 0, 1))).correct
    assert not judge(image, SceneSpec(objects, Relation("above", 0, 1))).correct


def test_eval_sets():
    sets = eval_prompt_sets()
    assert {s.combos[0] for s in sets["single_held_out"]} == set(HELD_OUT)
    assert {s.combos[0] for s in sets["single_held_in"]} == set(HELD_IN)
    assert all(len(s.objects) == 2 for s in sets["two_objects"]) and all(len(s.objects) == 3 for s in sets["three_objects"])
    assert all(not set(s.combos) & HELD_OUT for s in sets["two_objects"] + sets["three_objects"])
    assert any(s.relation for s in sets["two_objects"])


def test_diversity_of_the_worlds_own_renders_is_one_and_of_a_collapsed_model_zero():
    from prx.data.judge import FACTORS, scene_factors, world_factors
    from prx.data.shapes import eval_prompt_sets, make_scene, render
    from prx.evaluate import diversity

    specs = eval_prompt_sets()["single_held_in"]
    world = world_factors(specs, 64, seed=0)
    assert len(world) == 4 * len(specs)  # the judge finds every rendered object
    spread = world.std(0)
    assert abs(spread[0] - 0.06 / 12**0.5) < 0.004 and abs(spread[1] - 0.04 / 12**0.5) < 0.002  # U(.20,.26), U(±.02)
    assert abs(spread[3] - 6.05) < 0.6  # U{225..245}
    same = diversity(world_factors(specs, 64, seed=1), world)  # other draws of the world itself
    assert all(0.9 < same["spread"][f] < 1.1 for f in FACTORS) and same["fd"] < 0.05
    # a "model" that always draws the same scene for a prompt: no spread left, far from the world
    rows = [row for i, spec in enumerate(specs)
            for row in scene_factors(render(make_scene(spec, np.random.default_rng(7)), 64), spec) * 4]
    collapsed = diversity(np.array(rows), world)
    assert collapsed["spread"]["background"] == 0 and collapsed["fd"] > 1


def test_two_object_prompts_are_broken_down_by_layout():
    from prx.data.shapes import LAYOUTS, Relation, layout_of
    from prx.evaluate import format_table, layout_breakdown

    def two(a, b, relation=None):
        return SceneSpec((ShapeObject("red", "circle", a), ShapeObject("blue", "square", b)), relation)

    assert layout_of(two("top left", "bottom right")) == "diagonal"
    assert layout_of(two("top left", "top right")) == layout_of(two("top right", "bottom right")) == "same row or column"
    assert layout_of(two("center", "bottom left")) == "with the centre"
    assert layout_of(two("top left", "top right", Relation("left of", 0, 1))) == "relational"
    assert layout_of(SceneSpec((ShapeObject("red", "circle", "center"),))) is None
    specs = eval_prompt_sets()["two_objects"]
    assert {layout_of(s) for s in specs} == set(LAYOUTS)  # the eval set has every layout
    # The world's own renders: every layout all-correct. The same diagonal prompt drawn with the
    # objects in the two other corners (what a model that reads "top" and "left" apart may draw) fails.
    rng = np.random.default_rng(0)
    verdicts = [judge(render(make_scene(s, rng), 64), s) for s in specs]
    table = layout_breakdown(specs, verdicts)
    assert set(table) == set(LAYOUTS) and sum(r["n"] for r in table.values()) == len(specs)
    assert all(r["count"] == r["all_correct"] == 1.0 for r in table.values())
    assert table["relational"]["objects_elsewhere"] is None
    assert all(table[layout]["objects_elsewhere"] == 0 for layout in LAYOUTS[:3])
    diagonal = two("top left", "bottom right")
    swapped = render(make_scene(two("bottom left", "top right"), rng), 64)
    wrong = layout_breakdown([diagonal], [judge(swapped, diagonal)])
    assert wrong == {"diagonal": {"n": 1, "count": 1.0, "all_correct": 0.0, "objects_elsewhere": 2.0}}
    assert layout_breakdown(eval_prompt_sets()["single_held_in"], verdicts[:1]) == {}  # no two-object prompt
    results = {"sets": {"two_objects": {"n": len(specs), "color": 1, "shape": 1, "position": 1, "count": 1,
                                        "all_correct": 1, "diversity": {"objects": 0, "spread": {f: None for f in
                                        ("size", "dx", "dy", "background")}, "fd": None}, "by_layout": table}}}
    assert "two_objects, by layout" in format_table(results) and "diagonal" in format_table(results)


def test_the_shapes_source_renders_the_next_batch_ahead_and_gives_the_same_batches():
    """The next step's batch renders in a thread: in order, out of order, repeated and across a stage change,
    every batch equals the one rendered in place."""
    import torch

    from prx.config import load_config
    from prx.data.sources import build_source

    cfg = load_config("demo", ["train.time_budget_minutes=0", "train.stages=[{resolution: 32, batch_size: 4, steps: 3}, "
                               "{resolution: 48, batch_size: 2, steps: 3}]"])
    ahead, inline = build_source(cfg), build_source(cfg)
    inline.render_ahead = False
    for step in (0, 1, 2, 3, 4, 4, 1, 5, 7):
        index, stage = cfg.stage_at(step)
        a, b = ahead.batch(step, index, stage), inline.batch(step, index, stage)
        assert torch.equal(a.images, b.images) and a.captions == b.captions and a.ids == b.ids
        assert a.images.shape == (stage.batch_size, 3, stage.resolution, stage.resolution) and a.images.is_contiguous()


def test_the_shapes_source_renders_large_batches_on_several_threads_alike():
    """Where cores are plenty (a GPU host) a large batch renders on a thread pool: the same batch, in order."""
    import torch

    from prx.config import load_config
    from prx.data.sources import build_source

    cfg = load_config("demo", ["train.time_budget_minutes=0", "train.stages=[{resolution: 256, batch_size: 8, steps: 2}]"])
    pooled, serial = build_source(cfg), build_source(cfg)
    pooled.render_threads, serial.render_threads = 3, 1
    index, stage = cfg.stage_at(1)
    a, b = pooled.batch(1, index, stage), serial.batch(1, index, stage)
    assert pooled._pool is not None and serial._pool is None
    assert torch.equal(a.images, b.images) and a.captions == b.captions


def test_the_shapes_source_writes_a_gpu_runs_batch_into_pinned_memory_alike(monkeypatch):
    """Training on a GPU, a batch is written straight into pinned memory in the render thread (numpy's copy, channels
    first): the same images as the plain batch. (This CPU cannot pin, so the allocation is recorded and made plain.)"""
    import torch

    from prx.config import load_config
    from prx.data.sources import build_source

    cfg = load_config("demo", ["train.time_budget_minutes=0", "train.stages=[{resolution: 48, batch_size: 3, steps: 2}]"])
    pinned, plain = build_source(cfg), build_source(cfg)
    assert not pinned.pin_memory  # a CPU run pins nothing
    pinned.pin_memory = True
    asked, empty = [], torch.empty

    def unpinned_empty(*shape, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned_empty)
    index, stage = cfg.stage_at(1)
    a, b = pinned.batch(1, index, stage), plain.batch(1, index, stage)
    pinned.finish_rendering()
    assert True in asked and a.images.dtype == torch.uint8 and a.images.is_contiguous()
    assert torch.equal(a.images, b.images) and a.captions == b.captions
