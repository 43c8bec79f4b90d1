"""Prompt adherence and diversity on the shapes world, judged from pixels by the exact judge.

Samples the held-in single-object prompts, the held-out colour–shape–position combinations
(never rendered in training), and two- and three-object prompts; reports per-attribute and
all-correct accuracy for each set, and how much of the world's own random spread (object size,
centre offset, background grey) the generated images keep: per-factor ratios of standard
deviations and a Fréchet distance between the factor distributions in units of the world's spread
(0 = the world's distribution) — an exact, offline analogue of FID for this world.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from prx.config.sampling import SamplingConfig
from prx.data.judge import FACTORS, judge, scene_factors, world_factors
from prx.data.shapes import LAYOUTS, canonical_caption, eval_prompt_sets, layout_of
from prx.errors import PrxError
from prx.images import save_grid
from prx.metrics.stats import frechet_distance
from prx.pipeline import Pipeline
from prx.sampling import check_request

SETTINGS = ("steps", "guidance", "guidance_scale", "self_guidance_scale", "sampler", "seed")  # in results.json
MIN_JUDGE_RESOLUTION = 48  # below this, circles and squares are a few pixels apart


def evaluate(pipe: Pipeline, out_dir: str | Path | None = None, sampling: SamplingConfig | None = None,
             sets: dict | None = None, batch_size: int = 64, progress=None, **overrides) -> dict:
    """Sample each prompt set (default: :func:`eval_prompt_sets`) and judge it; ``sampling`` (default the run's, with
    ``overrides`` of its fields) is how, set k drawing its images from seeds ``sampling.seed`` + 100000·k + i."""
    res = pipe.config.stages[-1].resolution
    if res < MIN_JUDGE_RESOLUTION:
        raise PrxError(
            f"the shapes judge needs images of at least {MIN_JUDGE_RESOLUTION} px, this model samples {res} px: "
            f"train at data.resolution ≥ {MIN_JUDGE_RESOLUTION}"
        )
    sets = sets if sets is not None else eval_prompt_sets()

    s = (sampling or pipe.config.sampling).with_overrides(**overrides)
    check_request(100_000 * len(sets), s, batch_size)  # every value checked once, before any image
    results: dict = {"sets": {}, "settings": {}}
    started = time.monotonic()
    for offset, (name, specs) in enumerate(sets.items()):
        prompts = [canonical_caption(s) for s in specs]
        # Distinct seeds per set and per repeat of a prompt.
        images = pipe.generate(prompts, s, batch_size=batch_size, seed=s.seed + 100_000 * offset).numpy()
        verdicts = [judge(img, spec) for img, spec in zip(images, specs)]
        generated = np.array([row for img, spec in zip(images, specs) for row in scene_factors(img, spec)],
                             dtype=np.float64).reshape(-1, len(FACTORS))
        results["sets"][name] = {
            "n": len(specs),
            "color": float(np.mean([v.color for v in verdicts])),
            "shape": float(np.mean([v.shape for v in verdicts])),
            "position": float(np.mean([v.position for v in verdicts])),
            "count": float(np.mean([v.count for v in verdicts])),
            "all_correct": float(np.mean([v.correct for v in verdicts])),
            "failures": [p for p, v in zip(prompts, verdicts) if not v.correct][:20],
            "diversity": diversity(generated, world_factors(specs, res, seed=s.seed + offset)),
        }
        by_layout = layout_breakdown(specs, verdicts)
        if by_layout:
            results["sets"][name]["by_layout"] = by_layout
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            marks = [("ok " if v.correct else "X ") + p for p, v in zip(prompts, verdicts)]
            save_grid(images[:64], out / f"{name}.png", marks[:64], ncol=8)
        if progress is not None:
            progress(name, results["sets"][name])
    results["settings"] = {
        **{k: getattr(s, k) for k in SETTINGS},
        "resolution": res,
        "seconds": round(time.monotonic() - started, 1),
    }
    return results


def layout_breakdown(specs: list, verdicts: list) -> dict:
    """Two-object prompts split by how they place their objects (``shapes.layout_of``): count right,
    all-correct, and, where the prompt names both positions, the objects drawn per image at positions
    it did not name (for diagonal prompts: a model that reads "top" and "left" apart fills the two
    other corners). Empty when the set has no two-object prompt."""
    out = {}
    for layout in LAYOUTS:
        rows = [(spec, v) for spec, v in zip(specs, verdicts) if layout_of(spec) == layout]
        if not rows:
            continue
        elsewhere = None
        if layout != "relational":
            elsewhere = float(np.mean([sum(b.position not in {o.position for o in spec.objects} for b in v.blobs)
                                       for spec, v in rows]))
        out[layout] = {"n": len(rows), "count": float(np.mean([v.count for _, v in rows])),
                       "all_correct": float(np.mean([v.correct for _, v in rows])), "objects_elsewhere": elsewhere}
    return out


def diversity(generated: np.ndarray, world: np.ndarray) -> dict:
    """Per factor, the generated images' standard deviation over the world's (1 = as varied as the
    world, 0 = collapsed), and the Fréchet distance of the two factor distributions with each factor
    in units of the world's standard deviation. Rows: one per correctly drawn object."""
    out = {"objects": int(len(generated))}
    if len(generated) < 2 or len(world) < 2:
        return {**out, "spread": {f: None for f in FACTORS}, "fd": None}
    scale = world.std(0).clip(min=1e-9)
    out["spread"] = {f: float(g / w) for f, g, w in zip(FACTORS, generated.std(0), world.std(0))}
    g, w = torch.from_numpy(generated / scale), torch.from_numpy(world / scale)
    fd, _ = frechet_distance(g.mean(0), torch.cov(g.T), w.mean(0), torch.cov(w.T))
    out["fd"] = max(fd, 0.0)
    return out


def format_table(results: dict) -> str:
    header = f"{'prompt set':<16} {'n':>4} {'colour':>7} {'shape':>7} {'position':>9} {'count':>7} {'all-correct':>12}"
    lines = [header, "-" * len(header)]
    for name, r in results["sets"].items():
        lines.append(
            f"{name:<16} {r['n']:>4} {r['color']:>7.1%} {r['shape']:>7.1%} {r['position']:>9.1%} "
            f"{r['count']:>7.1%} {r['all_correct']:>12.1%}"
        )
    header = f"{'diversity':<16} {'objects':>7} " + " ".join(f"{f:>10}" for f in FACTORS) + f" {'FD':>8}"
    lines += ["", header + "   (generated spread / the world's; FD 0 = the world's distribution)", "-" * len(header)]
    for name, r in results["sets"].items():
        d = r["diversity"]
        spread = " ".join(f"{d['spread'][f]:>10.2f}" if d["spread"][f] is not None else f"{'—':>10}" for f in FACTORS)
        lines.append(f"{name:<16} {d['objects']:>7} {spread} {d['fd']:>8.2f}" if d["fd"] is not None
                     else f"{name:<16} {d['objects']:>7} {spread} {'—':>8}")
    layouts = {name: r["by_layout"] for name, r in results["sets"].items() if r.get("by_layout")}
    for name, by_layout in layouts.items():
        header = (f"{name + ', by layout':<28} {'n':>4} {'count':>7} {'all-correct':>12} {'objects elsewhere':>18}")
        lines += ["", header + "   (per image, at positions the prompt did not name)", "-" * len(header)]
        for layout, r in by_layout.items():
            elsewhere = f"{r['objects_elsewhere']:>18.2f}" if r["objects_elsewhere"] is not None else f"{'—':>18}"
            lines.append(f"{layout:<28} {r['n']:>4} {r['count']:>7.1%} {r['all_correct']:>12.1%} {elsewhere}")
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2))
