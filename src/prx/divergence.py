"""Divergence: which steps are bad, and which checkpoints a diverging run may trust.

A step is **bad** when its loss or gradient norm is non-finite on any rank, or when it has blown up: its flow loss
(the mean over the ranks) or its gradient norm is more than ``train.divergence_factor`` times the median of the last
good steps of its stage. A bad step's update is dropped on every rank and counted; more than
``train.max_bad_steps`` stop the run.

A checkpoint holds the weights of the last update before it, and only the next step's loss says whether that update
was sound (a learning rate of 1e10 gives a finite loss on the step that ruins the weights, and a non-finite one on
every step after it). So a checkpoint is **confirmed** by the first good step after it: bad steps do not change the
weights, so a good step later still judges the same weights. Until then:

- no checkpoint is written while the last step was bad (its weights just gave a bad loss);
- pruning never deletes the newest confirmed checkpoint (:attr:`Health.confirmed`);
- a run that stops while diverging sets the unconfirmed checkpoints aside (``checkpoints/.diverged_step_N``) and points
  ``latest`` at the newest confirmed one, which its error names: lower the LR and the same command resumes there.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from collections import deque
from pathlib import Path

from prx.distributed import agree_and_mean
from prx.errors import TrainingError
from prx.rundir import LATEST, step_dir_name, step_of

WINDOW = 50  # good steps whose median is the reference
MIN_HISTORY = 10  # good steps of the stage needed before a finite value can count as blown up
DIVERGED_PREFIX = ".diverged_"


class Health:
    """The run's watch over divergence: the reference window of good steps, whether the last step was bad, the
    current streak of bad steps, and the newest confirmed and unconfirmed checkpoints (as steps)."""

    def __init__(self, factor: float):
        self.factor = factor
        self.window: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (flow loss, grad norm) of good steps
        self.stage: int | None = None
        self.last_bad = False
        self.reason = ""  # why the last bad step was bad
        self.streak_start: int | None = None  # the first bad step of the current streak (0-based)
        self.confirmed: int | None = None  # the newest checkpoint a good step has confirmed
        self.unconfirmed: int | None = None  # the newest checkpoint written since, not yet confirmed

    def judge(self, step: int, stage: int, finite: bool, loss: float, grad_norm: float) -> str | None:
        """Why step ``step`` (0-based) is bad, or None when it is good (then it joins the reference window and
        confirms the checkpoint written before it). ``finite``: every rank's values are finite; ``loss``: the flow
        loss, the mean over the ranks; ``grad_norm``: the global one."""
        if stage != self.stage:  # another resolution or set of losses: another scale
            self.stage, self.window = stage, deque(maxlen=WINDOW)
        reason = None if finite else "non-finite"
        if finite and self.factor and len(self.window) >= MIN_HISTORY:
            for name, value, reference in (("flow loss", loss, statistics.median(v[0] for v in self.window)),
                                           ("gradient norm", grad_norm, statistics.median(v[1] for v in self.window))):
                if reference > 0 and value > self.factor * reference:
                    reason = (f"{name} {value:.3g} is {value / reference:.3g}× the median of the last "
                              f"{len(self.window)} good steps ({reference:.3g}; "
                              f"train.divergence_factor={self.factor:g})")
                    break
        if reason is None:
            self.window.append((float(loss), float(grad_norm)))
            self.last_bad, self.streak_start = False, None
            if self.unconfirmed is not None:
                self.confirmed, self.unconfirmed = self.unconfirmed, None
        else:
            self.last_bad, self.reason = True, reason
            if self.streak_start is None:
                self.streak_start = step
        return reason

    def judge_step(self, step: int, stage: int, losses: dict[str, float], grad_norm: float, dist) -> str | None:
        """:meth:`judge` of a training step from its losses (this rank's) and its global gradient norm: every rank
        judges the same values (one collective)."""
        finite = all(map(math.isfinite, [grad_norm, *losses.values()]))
        finite, flow = agree_and_mean(finite, losses["flow"], dist)
        return self.judge(step, stage, finite, flow, grad_norm)

    def saved(self, step: int) -> None:
        """A checkpoint of ``step`` was written (or is being written): confirmed by the next good step."""
        self.unconfirmed = step

    def resumed(self, step: int) -> None:
        """The run resumed from checkpoint ``step``: the one to fall back to."""
        self.confirmed, self.unconfirmed = step, None

    def state_dict(self) -> dict:
        """What a resumed run needs to judge its steps as the uninterrupted run does (the reference window)."""
        return {"stage": self.stage, "window": [list(v) for v in self.window]}

    def load_state_dict(self, state: dict) -> None:
        window = [(float(a), float(b)) for a, b in state.get("window", [])]
        if not all(math.isfinite(a) and math.isfinite(b) for a, b in window):
            raise ValueError("health.window")
        self.stage = state.get("stage")
        self.window = deque(window, maxlen=WINDOW)


def set_aside_unconfirmed(root: Path, confirmed: int | None) -> list[str]:
    """Move the checkpoints newer than ``confirmed`` (all of them when None) aside as ``.diverged_step_N`` (only the
    newest such directory is kept) and point ``latest`` at the newest remaining one. Returns the names moved."""
    if not root.is_dir():
        return []
    moved = []
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)
    for path in steps:
        if confirmed is None or step_of(path) > confirmed:
            for old in root.glob(f"{DIVERGED_PREFIX}step_*"):
                shutil.rmtree(old, ignore_errors=True)
            os.rename(path, root / f"{DIVERGED_PREFIX}{path.name}")
            moved.append(path.name)
    link = root / LATEST
    if moved:
        if link.is_symlink() or link.exists():
            link.unlink()
        if confirmed is not None and (root / step_dir_name(confirmed)).is_dir():
            tmp = root / f".{LATEST}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(step_dir_name(confirmed), tmp)
            os.replace(tmp, link)
    return moved


def _newest_confirmed(trainer) -> tuple[Path | None, list[str]]:
    """Set the unconfirmed checkpoints aside (rank 0; every rank waits for a checkpoint still being written first)
    and return the newest confirmed one with the names set aside."""
    trainer.checkpoints.wait()
    confirmed = trainer.health.confirmed
    moved = set_aside_unconfirmed(trainer.rundir.checkpoints, confirmed) if trainer.dist.is_main else []
    path = trainer.rundir.checkpoint(confirmed) if confirmed is not None else None
    return (path if path is not None and path.is_dir() else None), moved


def _where_to_resume(path: Path | None, moved: list[str], lr: float) -> str:
    aside = (f" ({', '.join(moved)} was written after the last sound step and is set aside as "
             f"{DIVERGED_PREFIX}{moved[-1]})" if moved else "")
    fix = f"lower optimizer.lr (now {lr:g}) or raise optimizer.warmup_steps"
    if path is None:
        return (f"No checkpoint of this run gave sound losses{aside}: {fix} and run the same command, which starts "
                f"the run again")
    return (f"The newest checkpoint whose weights gave sound losses is {path}{aside}, and latest points to it: {fix} "
            f"and run the same command to resume from it")


def count_bad_step(trainer, losses: dict[str, float], grad_norm: float, reason: str) -> float:
    """Count a bad step (its update is dropped); stop the run after more than ``train.max_bad_steps``, naming the
    newest checkpoint whose weights gave sound losses; say so at the first of a streak. The step's loss to report."""
    trainer.bad_steps += 1
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    which = ", ".join(f"{k}={v:.3g}" for k, v in bad.items()) or (
        f"grad norm {grad_norm:.3g}" if reason == "non-finite" else reason)
    if trainer.bad_steps > trainer.config.train.max_bad_steps:
        raise diverged_error(trainer, which)
    if trainer.health.streak_start == trainer.step:  # the first of a streak
        trainer.log(f"warning: step {trainer.step + 1} is bad ({which}): its update is dropped, and no checkpoint is "
                    f"written until a step is sound again")
    return sum(losses.values()) if bad else grad_norm


def diverged_error(trainer, which: str) -> TrainingError:
    """The error of a run that had more than ``train.max_bad_steps`` bad steps: how many, since when, and the
    checkpoint to resume from (unconfirmed ones set aside)."""
    health, cfg = trainer.health, trainer.config
    path, moved = _newest_confirmed(trainer)
    streak = trainer.step + 1 - health.streak_start
    return TrainingError(
        f"{trainer.bad_steps} steps had a non-finite or blown-up loss or gradient (limit train.max_bad_steps="
        f"{cfg.train.max_bad_steps}), the last {streak} "
        f"in a row since step {health.streak_start + 1} (last: {which}). "
        + _where_to_resume(path, moved, cfg.optimizer.lr))


def ended_diverging(trainer) -> Path | None:
    """A run that ends (done, a signal, a time limit) right after a bad step writes no checkpoint of the weights that
    gave it; it says so and returns the newest confirmed checkpoint (None: there is none)."""
    health = trainer.health
    path, moved = _newest_confirmed(trainer)
    trainer.log(f"warning: the run ends after {trainer.step - health.streak_start} bad step(s) since step "
                f"{health.streak_start + 1} ({health.reason}): no checkpoint is written of the weights that gave them. "
                + _where_to_resume(path, moved, trainer.config.optimizer.lr))
    return path
