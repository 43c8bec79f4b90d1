"""What an ablation measures of each finished arm, with prx's own evaluation code:

- the validation loss by noise bin on held-out data (:mod:`prx.metrics.val_loss`, logged by the run's
  ``eval:`` section during training, which gives the curve, and at its end);
- on the shapes world, the judge's all-correct rates and its diversity figure (:func:`prx.evaluate.evaluate`);
- the real-data image metrics (FID, FD-DINOv2, CMMD, CLIP score) whose weights are on this machine;
- steps, training seconds, FLOPs (:func:`prx.flops.step_flops`) and images/s.

For the shapes world the held-out set is scenes the training stream never draws: training reads scene
0, 1, 2, … of its world; the held-out shards hold scenes from index 2**40 on (of the training
distribution, held-out colour–shape–position combinations excluded: those are the judge's).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from PIL import Image

from prx.ablate.arms import is_stand_in
from prx.ablate.budget import flops_until, stage_step_flops
from prx.ablate.runs import ArmRun, Settings
from prx.checkpoint import checkpoint_config, checkpoint_meta, find_checkpoint
from prx.data.shapes import ShapesWorld, eval_prompt_sets, render
from prx.data.shards import write_shard
from prx.errors import PrxError
from prx.evaluate import MIN_JUDGE_RESOLUTION, evaluate, write_json
from prx.metrics.during_training import TrainingEval, results_path
from prx.metrics.evaluate_real import HeldOutSet, build_extractors, evaluate_real
from prx.pipeline import Pipeline
from prx.rundir import RunDir

HELDOUT_START = 2**40  # the first held-out scene: far past any training stream's reach
SAMPLING_METRICS = ("fid", "fd_dinov2", "cmmd", "clip_score")
JUDGE_SETS = {"single_held_in": "judge: single, held-in", "single_held_out": "judge: single, held-out",
              "two_objects": "judge: two objects", "three_objects": "judge: three objects"}


def write_heldout_shapes(out: Path, count: int, resolution: int, object_count_weights) -> Path:
    """``count`` scenes of the shapes world that no training stream draws, as prx shards in ``out``."""
    world = ShapesWorld(resolution, 0, "train", object_count_weights)
    rows = []
    for i in range(HELDOUT_START, HELDOUT_START + count):
        scene, buffer = world.scene(i), io.BytesIO()
        Image.fromarray(render(scene, resolution)).save(buffer, format="PNG")
        rows.append({"id": f"shapes-heldout-{i}", "image": buffer.getvalue(), "width": resolution, "height": resolution,
                     "format": "PNG", "source": "shapes held-out", "caption": scene.caption})
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "shapes-heldout-00000.parquet", rows, ["caption"])
    return out


# --------------------------------------------------------------------------------------------
# From the run's own logs: the curve, training seconds
# --------------------------------------------------------------------------------------------


def read_rows(run: RunDir) -> list[dict]:
    path = run.metrics
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def training_seconds(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, seconds of training up to it) at every logged step: each log row's steps/s covers the steps since
    the row before (evaluations are not in it; the steps of an interrupted attempt that were redone are not)."""
    out, total, previous = [(0, 0.0)], 0.0, 0
    for row in rows:
        rate = row.get("train/steps_per_s")
        if rate and row["step"] > previous:
            total += (row["step"] - previous) / rate
            previous = row["step"]
            out.append((previous, total))
    return out


def seconds_at(clock: list[tuple[int, float]], step: int) -> float:
    """Training seconds at ``step``, interpolated between logged steps."""
    for (s0, t0), (s1, t1) in itertools.pairwise(clock):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return clock[-1][1]


def val_curve(rows: list[dict], cfg, clock: list[tuple[int, float]]) -> list[dict]:
    """The held-out validation loss at each evaluation, with the FLOPs and training seconds spent by then."""
    per_step = stage_step_flops(cfg)
    return [{"step": r["step"], "flops": flops_until(cfg, r["step"], per_step), "seconds": seconds_at(clock, r["step"]),
             **{k.removeprefix("eval/"): r[k] for k in r if k.startswith("eval/val_loss")}}
            for r in rows if r.get("eval/val_loss") is not None]


def images_seen(cfg, step: int) -> int:
    total, start = 0, 0
    for stage in cfg.stages:
        total += max(0, min(step, start + stage.steps) - start) * stage.batch_size
        start += stage.steps
    return total


# --------------------------------------------------------------------------------------------
# Evaluations of the final checkpoint
# --------------------------------------------------------------------------------------------


def final_val_loss(run: RunDir, step: int, pipe, heldout, cfg) -> dict:
    """The run's own end-of-training evaluation (``RUN/eval/step_N/real/results.json``), or the same
    evaluation now when the run ended without it (an arm resumed after its last step)."""
    path = results_path(run, step)
    if path.is_file() and "val_loss" in json.loads(path.read_text())["metrics"]:
        results = json.loads(path.read_text())
    else:
        e = cfg.eval
        results = evaluate_real(pipe, None, ["val_loss"], len(heldout), seed=e.seed, batch_size=e.batch_size,
                                resolution=e.resolution, heldout=heldout)
        if _is_main():
            TrainingEval.write(run, step, results, None)
    r = results["metrics"]["val_loss"]
    out = {"val_loss": r["value"]}
    for name, b in zip(("t0.0-0.3", "t0.3-0.6", "t0.6-1.0"), r["bins"].values()):
        out[f"val_loss_{name}"] = b["value"]
    return out


def judge_sets(prompts_per_set: int) -> dict[str, list]:
    """The judge's prompt sets (``prx eval``'s), or ``prompts_per_set`` of each spread evenly over it (a set is
    sorted by colour)."""
    sets = eval_prompt_sets()
    if prompts_per_set:
        sets = {k: v[::max(1, len(v) // prompts_per_set)][:prompts_per_set] for k, v in sets.items()}
    return sets


def judge_shapes(pipe, out_dir: Path, prompts_per_set: int) -> dict:
    """The shapes judge's all-correct rate per prompt set and its diversity FD (single objects, held-in), written
    where ``prx eval`` writes (``RUN/eval/step_N/results.json``, grids beside it)."""
    results = evaluate(pipe, out_dir, sets=judge_sets(prompts_per_set))
    write_json(results, out_dir / "results.json")
    out = {f"judge/{k}": r["all_correct"] for k, r in results["sets"].items()}
    out["diversity/fd_single_held_in"] = results["sets"]["single_held_in"]["diversity"]["fd"]
    return out


@contextlib.contextmanager
def _offline():
    """Weights that are not on this machine fail at once (no download attempt)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def image_extractors(cfg, wanted: bool) -> tuple[list[str], dict, dict[str, str]]:
    """(metrics, their extractors, {metric: why skipped, or that its extractor is a stand-in}) for FID, FD-DINOv2,
    CMMD and CLIP score: each one whose weights load offline (``eval.inception_weights``, ``eval.dino_model``,
    ``eval.clip_model``)."""
    if not wanted:
        return [], {}, {m: "not measured (--no-image-metrics)" for m in SAMPLING_METRICS}
    names, extractors, notes = [], {}, {}
    e = cfg.eval
    # one extractor each; CLIP (built for the CLIP score, with its text tower) serves CMMD too
    for metrics, probe in ((["fid"], "fid"), (["fd_dinov2"], "fd_dinov2"), (["cmmd", "clip_score"], "clip_score")):
        try:
            with _offline():
                extractors.update(build_extractors([probe], e.inception_weights, e.clip_model, e.dino_model))
            names += metrics
            source = {"fid": e.inception_weights, "fd_dinov2": e.dino_model, "clip_score": e.clip_model}[probe]
            if is_stand_in(source):
                notes.update({m: f"measured with the random stand-in extractor '{source}': its numbers mean nothing"
                              for m in metrics})
        except PrxError as error:
            reason = re.split(r": |; ", str(error))[0][:200]  # its first clause: what is missing
            notes.update({m: f"skipped: {reason}" for m in metrics})
    return names, extractors, notes


def image_metrics(pipe, names: list[str], extractors: dict, heldout, cfg, out: Path) -> dict:
    """FID, FD-DINOv2, CMMD, CLIP score of the final EMA weights against the held-out images."""
    if not names:
        return {}
    e = cfg.eval
    results = evaluate_real(pipe, None, names, len(heldout), seed=e.seed, batch_size=e.batch_size,
                            resolution=e.resolution, sampling=e.sampling(cfg.sampling), extractors=extractors,
                            heldout=heldout)
    if _is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return {name: results["metrics"][name]["value"] for name in names}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------
# One finished arm, measured
# --------------------------------------------------------------------------------------------


@dataclass
class Measures:
    """What every arm is measured with, loaded once: the image metrics whose weights are here."""

    image_names: list[str]
    extractors: dict
    notes: dict[str, str]  # metric → why it was skipped, or that its extractor is a random stand-in


def measure_run(run: ArmRun, settings: Settings, measures: Measures, writer: bool) -> dict:
    """The finished arm's numbers from its newest checkpoint's EMA weights. ``writer``: this process judges the
    shapes (the others wait at the runner's barrier)."""
    ckpt, rundir = find_checkpoint(run.run_dir), RunDir(run.run_dir)
    step, cfg, notes = checkpoint_meta(ckpt)["step"], checkpoint_config(ckpt), []
    pipe = Pipeline.from_checkpoint(ckpt, weights="ema", device=cfg.train.device)
    e, eval_dir = cfg.eval, rundir.eval_dir(step)
    heldout = HeldOutSet.open(e.data, e.num_samples, e.seed, e.caption_column)
    result = final_val_loss(rundir, step, pipe, heldout, cfg)
    result.update(image_metrics(pipe, measures.image_names, measures.extractors, heldout, cfg,
                                rundir.real_eval_dir(step) / "images.json"))
    if cfg.data.dataset == "shapes" and cfg.stages[-1].resolution < MIN_JUDGE_RESOLUTION:
        notes.append(f"no shapes judge: it needs ≥ {MIN_JUDGE_RESOLUTION} px, the arm samples "
                     f"{cfg.stages[-1].resolution}")
    elif cfg.data.dataset == "shapes" and writer:
        result.update(judge_shapes(pipe, eval_dir, settings.judge_prompts))
    rows = read_rows(rundir)
    clock = training_seconds(rows)
    seconds = seconds_at(clock, step)
    result.update(steps=step, flops=flops_until(cfg, step), train_seconds=seconds,
                  images_per_s=images_seen(cfg, step) / seconds if seconds else None)
    return {"result": result, "curve": val_curve(rows, cfg, clock), "notes": notes, "metric_notes": measures.notes}
