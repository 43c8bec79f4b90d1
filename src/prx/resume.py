"""Resuming a run: which checkpoint it continues from, which keys of its config changed since it was saved, which of
them a resumed run can take (they take effect and are recorded), and which it must refuse (one line).

Each config section lists the keys it keeps for the life of a run in its ``FIXED_ON_RESUME`` (beside its fields);
the model's shape and the stage rules are checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prx.checkpoint import (
    checkpoint_config,
    checkpoint_meta,
    has_checkpoint,
    newest_intact,
    restore_training_state,
    set_aside_damaged,
)
from prx.config import SECTIONS, Config
from prx.config.model import same_model
from prx.config.rules import check
from prx.config.safe_yaml import short
from prx.distributed import all_agree, barrier
from prx.errors import CheckpointDamaged, CheckpointError, ConfigError
from prx.files import make_writable_dir
from prx.rundir import RunDir

CHOSEN_BY_THE_RUN = ("logging.sample_prompts",)  # null: the run chooses (and records) them, so null keeps its choice


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, with what the run learnt before it (trainer state, not config)."""

    path: Path
    step: int
    saved: Config  # the config its checkpoint was written with
    meta: dict  # its meta.json: step, format, files, and planned_steps when a time budget chose the count
    changes: tuple = ()  # the config keys that differ from its saved config: (key, saved value, new value)

    @property
    def norm_eps(self) -> float:
        """The weights' own LayerNorm eps (1e-5 in runs from before the option)."""
        return self.saved.model.norm_eps

    def planned_steps(self, config: Config) -> int | None:
        """The step count the run's time budget chose, when the resumed config still has a budget."""
        return self.meta.get("planned_steps") if config.train.time_budget_minutes else None


def checkpoint_to_resume(run: RunDir, resume: bool | None, config: Config, log=print,
                         is_main: bool = True) -> ResumePoint | None:
    """The run directory's newest intact checkpoint to continue from (None: a new run), after the checks (the config
    keys that differ from the run's saved config are printed; they take effect): ``resume`` True requires a
    checkpoint, False forbids one, None takes one if there is one; a checkpoint of another model shape, or a change of
    a key that cannot change mid-run, is refused; damaged checkpoints are skipped, saying so."""
    exists = has_checkpoint(run.root)
    if resume is True and not exists:
        raise CheckpointError(f"--resume given but '{run.root}' has no checkpoint: drop --resume to start a new run "
                              f"there")
    if resume is False and exists:
        raise CheckpointError(f"'{run.root}' already holds a run: resume it (drop the flag that forbids it) or choose "
                              f"--out")
    make_writable_dir(run.root, "run directory")
    if not exists:
        return None
    path = newest_intact(run.checkpoints, log if is_main else (lambda *a, **k: None), move_aside=is_main)
    point = ResumePoint(path, checkpoint_meta(path)["step"], checkpoint_config(path), checkpoint_meta(path))
    if not same_model(point.saved.model, config.model):
        raise CheckpointError(f"'{run.root}' holds a run with a different model config: use --out for a new run, or "
                              f"the run's own config ({run.config})")
    # compared with the step count its time budget chose, which is not a change of train.steps
    planned = point.planned_steps(config)
    compared = replace(config, train=replace(config.train, steps=planned)) if planned else config
    saved = replace(point.saved, train=replace(point.saved.train, steps=planned)) if planned else point.saved
    changes = resume_changes(saved, compared, point.step)
    if changes and is_main:  # they take effect; the trainer's config.yaml records them
        log(f"resuming with a changed config (recorded in {run.config}): {describe_changes(changes)}")
    return replace(point, changes=tuple(changes))


def restore_intact(trainer) -> None:
    """Restore the trainer from ``trainer.resume_from``. A checkpoint whose tensors turn out not to fit the config it
    was written with (found only now, as its files pass the checks) is damaged: it is moved aside like one found
    before, and the run resumes from the newest intact checkpoint before it, saying so. The checkpoint is the one a
    divergence falls back to; a resume with changed settings (a lower LR) gets a fresh allowance of bad steps."""
    for _ in range(100):
        error = None
        try:
            restore_training_state(trainer, trainer.resume_from.path)
        except CheckpointDamaged as e:
            error = e
        if all_agree(error is None, trainer.dist):
            trainer.health.resumed(trainer.step)
            if trainer.resume_from.changes:
                trainer.bad_steps = 0
            return
        bad = trainer.resume_from.path
        error = error or CheckpointDamaged(f"checkpoint '{bad}' is damaged (found by another rank)")
        try:  # only when there is one to fall back to, as newest_intact does
            newest_intact(trainer.rundir.checkpoints, lambda *a: None, move_aside=False, skip={bad.name})
        except CheckpointError:
            raise CheckpointDamaged(f"{error}; no intact checkpoint precedes it: start a new run with --out, or "
                                    f"restore the files") from None
        if trainer.dist.is_main:
            trainer.log(f"warning: {error}; it is kept as {set_aside_damaged(bad)}")
        barrier(trainer.dist)
        trainer.resume_from = checkpoint_to_resume(trainer.rundir, True, trainer.config, trainer.log,
                                                   trainer.dist.is_main)
    raise CheckpointDamaged(f"no intact checkpoint under '{trainer.rundir.checkpoints}'")


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else k, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flat(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value
    return out


def resume_changes(saved: Config, new: Config, step: int) -> list[tuple[str, Any, Any]]:
    """The keys whose value differs from a run's saved config when it resumes at ``step``, as
    (key, saved value, new value), after refusing the changes a run cannot take:

    - keys a section lists in its ``FIXED_ON_RESUME`` (text encoder, data source and plan, optimizer
      kind, REPA teacher, seed) and its ``check_resume(saved)`` rules; the model's shape is checked
      with the checkpoint (prx.checkpoint.checkpoint_to_resume);
    - the stages the run has trained in keep their resolution and batch size (the data position
      counts batches of that plan), finished ones their length, the current one may not end before
      the steps already done, and none of them may be removed.

    Everything else takes effect: optimizer LR and schedule, step counts, stages not started yet,
    losses and their weights, EMA, sampling, logging, checkpoint cadence, workers, time limit, ...
    """
    old, cur = _flat(saved.to_dict(), "", {}), _flat(new.to_dict(), "", {})
    changes = [(k, old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur), key=lambda k: (k.split(".")[0], k))
               if old.get(k) != cur.get(k) and not k.startswith("model.") and k != "name"
               and not (k in CHOSEN_BY_THE_RUN and cur.get(k) is None)]
    for key, before, after in changes:
        section, _, field_name = key.partition(".")
        owner = getattr(new, section, None)
        fixed = getattr(owner, "FIXED_ON_RESUME", ())
        if field_name.split(".")[0].split("[")[0] in fixed:
            raise ConfigError(f"{key} cannot change in a resumed run ({short(before)} → {short(after)}): the run's "
                              f"checkpoints depend on it; set it back, or use --out for a new run")
    for section_name in SECTIONS:
        section = getattr(new, section_name)
        if hasattr(section, "check_resume"):
            section.check_resume(getattr(saved, section_name))
    if step == 0:
        return changes
    index, _ = saved.stage_at(step - 1)  # the stage of the last step the run has done
    where = "train.stages" if new.train.stages or saved.train.stages else None

    def name(i: int, key: str) -> str:
        return f"{where}[{i}].{key}" if where else {"resolution": "data.resolution"}.get(key, f"train.{key}")

    check(len(new.stages) > index, f"the run has done {step} steps, in stage {index + 1}: its config needs at least "
                                   f"{index + 1} stage(s), got {len(new.stages)} (add stages, don't remove them)")
    for i in range(index + 1):
        a, b = saved.stages[i], new.stages[i]
        for key in ("resolution", "batch_size") + (("steps",) if i < index else ()):
            if getattr(a, key) != getattr(b, key):
                state = "finished" if i < index else "current"
                raise ConfigError(f"{name(i, key)} cannot change in a resumed run ({getattr(a, key)} → "
                                  f"{getattr(b, key)}): stage {i + 1} is the run's {state} stage at step {step}; "
                                  f"change later stages, add one, or use --out for a new run")
    end = sum(stage.steps for stage in new.stages[:index + 1])
    check(index == len(new.stages) - 1 or end >= step,
          f"{name(index, 'steps')}={new.stages[index].steps} would end stage {index + 1} at step {end}, but the run "
          f"has done {step} steps in it: give it at least {new.stages[index].steps + step - end} steps")
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {short(before)} → {short(after)}" for key, before, after in changes)
