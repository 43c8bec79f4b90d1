"""``prx ablate``: the recipe and its ablations as ordinary runs, at equal compute, then one report.

Each arm × seed is a run directory ``OUT/arms/ARM-sS`` that ``prx train`` resumes and every other
command reads. Arms of one seed see the same data in the same order and the same noise (both derive
from ``train.seed``; the shapes world's stream from ``data.shapes.seed``, set to the seed too). A
run's ``ablate.json`` records the config it was asked for and, once measured, its results: running
the same command again skips finished arms, resumes an interrupted one and refuses an arm whose
directory holds another config.

Under torchrun the arms run one after another on all ranks, or with ``--parallel-arms`` each rank
trains its share of them alone (the trainer sees a one-process job); rank 0 writes the report.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist

from prx.ablate.arms import Arm, arm_overrides, stand_in_tricks
from prx.ablate.budget import Budget, budget_overrides
from prx.ablate.measure import Measures, image_extractors, measure_run, write_heldout_shapes
from prx.ablate.report import write_report
from prx.ablate.runs import NOT_FINGERPRINTED, ArmRun, Settings, environment, finished, flat, write_state
from prx.checkpoint import has_checkpoint
from prx.config import Config, load_config
from prx.errors import ConfigError, PrxError
from prx.flops import fmt_flops
from prx.train import Trainer

# --------------------------------------------------------------------------------------------
# Building the arms' configs
# --------------------------------------------------------------------------------------------


def _load(settings: Settings, overrides: list[str], arm: Arm) -> Config:
    try:
        return load_config(settings.config, overrides)
    except ConfigError as e:
        raise ConfigError(f"arm '{arm.name}': {e}") from None


def _given(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in overrides}


def build_run(settings: Settings, base, arm: Arm, seed: int, heldout: list[str], placement: list[str]) -> ArmRun:
    """The arm's config: the held-out evaluation, the user's overrides, the arm's, the seed (the ablation's own),
    then the budget's step counts and the evaluation cadence (unless the user set it)."""
    overrides = [f"eval.data={json.dumps(heldout)}", "eval.metrics=[val_loss]",
                 f"eval.num_samples={settings.eval_samples}", "eval.seed=0"]
    overrides += placement + settings.overrides + arm_overrides(arm, base)
    overrides += [f"train.seed={seed}"] + ([f"data.shapes.seed={seed}"] if base.data.dataset == "shapes" else [])
    cfg = _load(settings, overrides, arm)
    overrides += budget_overrides(cfg, settings.budget)
    if settings.budget.kind != "minutes":  # (a time budget's step count is known only once it runs)
        total = _load(settings, overrides, arm).total_steps
        every = max(1, math.ceil(total / settings.points))
        wanted = {"eval.every": every, "train.checkpoint_every": every, "logging.sample_every": total}
        given = _given(settings.overrides + list(arm.overrides))
        overrides += [f"{k}={v}" for k, v in wanted.items() if k not in given]
    overrides.append(f"name={base.name}-{arm.name}-s{seed}")
    cfg = _load(settings, overrides, arm)
    requested = {k: v for k, v in flat(cfg.to_dict()).items() if k not in NOT_FINGERPRINTED}
    return ArmRun(arm, seed, cfg, overrides, settings.out / "arms" / f"{arm.name}-s{seed}", requested,
                  stand_in_tricks(cfg))


def placement_overrides(parallel: bool, local_rank: int, local_world: int) -> list[str]:
    """With --parallel-arms each rank trains alone: on its own GPU, or on its share of the CPU cores."""
    if not parallel:
        return []
    if torch.cuda.is_available():
        return [f"train.device=cuda:{local_rank}"]
    return [f"train.num_threads={max(1, (os.cpu_count() or 1) // local_world)}"]


# --------------------------------------------------------------------------------------------
# Held-out data
# --------------------------------------------------------------------------------------------


def heldout_plan(settings: Settings, base) -> tuple[list[str], dict | None]:
    """(the held-out data every arm is measured on, what ablate writes there itself or None): --heldout, the
    config's eval.data, or on the shapes world scenes no training stream draws, in OUT/heldout."""
    if settings.heldout:
        return [settings.heldout], None
    if base.eval.data:
        return list(base.eval.data), None
    if base.data.dataset != "shapes":
        raise PrxError("no held-out data: give --heldout DIR (prx shards never trained on) or set eval.data in the "
                       "config, for the validation loss and the image metrics")
    want = {"samples": settings.eval_samples, "resolution": max(s.resolution for s in base.stages),
            "object_count_weights": list(base.data.shapes.object_count_weights)}
    return [str(settings.out / "heldout")], want


def write_heldout(settings: Settings, want: dict, main: bool) -> None:
    """The shapes world's held-out scenes in OUT/heldout, written once by rank 0 (the other ranks wait for it)."""
    path = settings.out / "heldout"
    marker = path / "heldout.json"
    if main and not marker.is_file():
        tmp = settings.out / f".heldout-{os.getpid()}"
        write_heldout_shapes(tmp, want["samples"], want["resolution"], want["object_count_weights"])
        (tmp / "heldout.json").write_text(json.dumps(want))
        os.replace(tmp, path)
    for _ in range(1800):
        if marker.is_file():
            break
        time.sleep(0.5)
    have = json.loads(marker.read_text())
    if have != want:
        raise PrxError(f"{path} holds held-out scenes for {have}, this command asks for {want}: use the first "
                       f"command's --eval-samples and config, or another --out")


# --------------------------------------------------------------------------------------------
# Progress: a line per arm and the time left
# --------------------------------------------------------------------------------------------


def fmt_seconds(seconds: float) -> str:
    seconds = round(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``[ablate k/n] ARM-sS: …`` lines, and the time left: an arm already trained with another seed in this session
    takes as long again; any other, this session's pace (seconds per planned FLOP, or per budgeted second) times its
    work. (Arms differ in seconds per FLOP: the estimate firms up as each arm's first seed finishes.)"""

    def __init__(self, runs: list[ArmRun], budget: Budget, log=print, where: str = ""):
        self.runs, self.budget, self.log, self.where = runs, budget, log, where
        self.left = {run.key for run in runs}
        self.done_work = self.spent = 0.0
        self.took: dict[str, float] = {}  # arm name → seconds its last run took

    def work(self, run: ArmRun) -> float:
        return self.budget.value * 60 if self.budget.kind == "minutes" else run.planned_flops

    def line(self, run: ArmRun, text: str) -> None:
        index = [r.key for r in self.runs].index(run.key) + 1
        self.log(f"[ablate{self.where} {index}/{len(self.runs)}] {run.key}: {text}", flush=True)

    def start(self, run: ArmRun, resuming: bool) -> None:
        what = (f"{self.budget.value:g} min" if self.budget.kind == "minutes" else
                f"{run.config.total_steps} steps, {fmt_flops(run.planned_flops)}")
        self.line(run, f"{'resuming' if resuming else 'training'} ({what}) in {run.run_dir}")

    def skip(self, run: ArmRun) -> None:
        self.left.discard(run.key)
        self.line(run, "finished before: skipped")

    def done(self, run: ArmRun, result: dict, seconds: float) -> None:
        self.left.discard(run.key)
        self.done_work += self.work(run)
        self.spent += seconds
        self.took[run.arm.name] = seconds
        self.line(run, f"done in {fmt_seconds(seconds)}: {summary(result)}; {self.time_left()}")

    def time_left(self) -> str:
        if not self.left:
            return "no arm left"
        if not self.done_work:
            return f"{len(self.left)} arm run(s) left, time unknown until one finishes"
        pace = self.spent / self.done_work
        seconds = sum(self.took.get(r.arm.name, pace * self.work(r)) for r in self.runs if r.key in self.left)
        return f"{len(self.left)} arm run(s) left, about {fmt_seconds(seconds)}"


def summary(result: dict) -> str:
    parts = [f"{result['steps']} steps", f"val loss {result['val_loss']:.4f}"]
    parts += [f"{name.split('/')[1].replace('_', ' ')} {result[name]:.0%}" for name in
              ("judge/single_held_in", "judge/single_held_out", "judge/two_objects") if result.get(name) is not None]
    if result.get("images_per_s"):
        parts.append(f"{result['images_per_s']:.1f} img/s")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Training and measuring one arm
# --------------------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_arm(run: ArmRun, settings: Settings, measures: Measures, progress: Progress, writer: bool) -> int:
    """Train (or resume) the arm, measure it, record it; 0, or the exit code of a run stopped by a signal.
    ``writer``: this process writes the arm's files (rank 0, or each rank of --parallel-arms)."""
    if finished(run):
        progress.skip(run)
        return 0
    resuming = has_checkpoint(run.run_dir)
    if writer:
        write_state(run)
    progress.start(run, resuming)
    started = time.monotonic()
    trainer = Trainer(copy.deepcopy(run.config), run.run_dir)  # the trainer fills in its config (text width, steps)
    trainer.run()
    if trainer.exit_code:
        return trainer.exit_code
    measured = measure_run(run, settings, measures, writer)
    if trainer.stop_reason:
        measured["notes"].append(f"training stopped early: {trainer.stop_reason}")
    if writer:
        measured["result"]["wall_seconds"] = time.monotonic() - started
        write_state(run, **measured, trained_with=environment())
        progress.done(run, measured["result"], time.monotonic() - started)
    _barrier()
    return 0


# --------------------------------------------------------------------------------------------
# The whole ablation
# --------------------------------------------------------------------------------------------


def plan_lines(runs: list[ArmRun], done: list[ArmRun]) -> list[str]:
    """--dry-run: each arm's steps (per stage), FLOPs, stand-in teachers and overrides of the config."""
    lines = []
    for run in runs:
        stages = " + ".join(str(s.steps) for s in run.config.stages)
        stand_ins = f", stand-in teachers: {', '.join(sorted(run.stand_ins))}" if run.stand_ins else ""
        state = " (finished)" if run in done else ""
        lines.append(f"  {run.key:<20} {run.config.total_steps:>8} steps ({stages}), {fmt_flops(run.planned_flops)}"
                     f"{stand_ins}{state}")
        lines.append(f"  {'':<20} {' '.join(run.arm.overrides) or '(the config as given)'}")
    return lines


def leave_torchrun_job() -> None:
    """--parallel-arms: this rank trains its arms alone, so the trainer must see a one-process job."""
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK="0")


def share(runs: list[ArmRun], arms: int, rank: int, world: int) -> list[ArmRun]:
    """This rank's runs under --parallel-arms, dealt in arm-major order so that an arm's seeds go to different ranks
    (each rank gets a like mix of cheap and dear arms), and trained in the command's order."""
    arm_major = sorted(range(len(runs)), key=lambda i: (i % arms, i // arms))
    mine = set(arm_major[rank::world])
    return [run for i, run in enumerate(runs) if i in mine]


def wait_for(runs: list[ArmRun], log=print) -> None:
    """Rank 0 of --parallel-arms: until every other rank's arms are recorded (torchrun stops the job if one fails)."""
    waiting = None
    while left := [run.key for run in runs if not finished(run)]:
        if waiting != len(left):
            log(f"[ablate] waiting for {len(left)} arm run(s) on other ranks: {', '.join(left[:6])}", flush=True)
            waiting = len(left)
        time.sleep(5)


def run_ablation(settings: Settings, log=print) -> int:
    """Train every arm × seed that is not finished, measure it, write the report; returns an exit code."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    parallel, main = settings.parallel_arms and world > 1, rank == 0
    base = load_config(settings.config, settings.overrides)  # the user's overrides fail here, before any arm's
    if parallel:
        leave_torchrun_job()
    heldout, to_write = heldout_plan(settings, base)
    placement = placement_overrides(parallel, local_rank, local_world)
    runs = [build_run(settings, base, arm, seed, heldout, placement)
            for seed in settings.seeds for arm in settings.arms]
    done = [run for run in runs if finished(run)]  # (an arm directory of another config fails here)
    if settings.dry_run:
        if main:
            log(f"[ablate] the plan ({settings.budget.describe()}); nothing trained:")
            for line in plan_lines(runs, done):
                log(line)
        return 0
    if settings.report_only:
        for line in write_report(settings, runs) if main else []:
            log(line)
        return 0
    if to_write:  # (after every arm's config is known to be good)
        write_heldout(settings, to_write, main)
    if main:
        log(f"[ablate] {len(settings.arms)} arm(s) × {len(settings.seeds)} seed(s) = {len(runs)} runs in "
            f"{settings.out / 'arms'}, {settings.budget.describe()}; {len(done)} finished before"
            + (f"; {world} ranks train their share each (--parallel-arms)" if parallel else ""), flush=True)
        if settings.parallel_arms and not parallel:
            log("[ablate] --parallel-arms without torchrun's ranks: the arms run one after another", flush=True)
    measures = Measures(*image_extractors(base, settings.image_metrics)) if len(done) < len(runs) else None
    mine = share(runs, len(settings.arms), rank, world) if parallel else runs
    progress = Progress(mine, settings.budget, log if main or parallel else (lambda *a, **k: None),
                        f" rank {rank}" if parallel else "")
    for run in mine:
        if code := run_arm(run, settings, measures, progress, writer=main or parallel):
            return code
        if main and run is not mine[-1]:
            write_report(settings, runs, plots=False)  # the table so far, while the other arms train
    if not main:
        return 0
    if parallel:
        wait_for(runs, log)
    for line in write_report(settings, runs):
        log(line)
    return 0
