"""Resuming with a changed config: which keys differ from the run's saved config, which of them a
resumed run can take (they take effect and are recorded), and which it must refuse (one line).

Each config section lists the keys it keeps for the life of a run in its ``FIXED_ON_RESUME``
(beside its fields); the stage rules are here.
"""

from __future__ import annotations

from typing import Any

from prx.checks import check
from prx.config import SECTIONS, Config
from prx.errors import ConfigError


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
               if old.get(k) != cur.get(k) and not k.startswith("model.") and k != "name"]
    for key, before, after in changes:
        section, _, field_name = key.partition(".")
        owner = getattr(new, section, None)
        fixed = getattr(owner, "FIXED_ON_RESUME", ())
        if field_name.split(".")[0].split("[")[0] in fixed:
            raise ConfigError(f"{key} cannot change in a resumed run ({before!r} → {after!r}): the run's checkpoints "
                              f"depend on it; set it back, or use --out for a new run")
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
                raise ConfigError(f"{name(i, key)} cannot change in a resumed run ({getattr(a, key)} → {getattr(b, key)}): "
                                  f"stage {i + 1} is the run's {state} stage at step {step}; change later stages, add "
                                  f"one, or use --out for a new run")
    end = sum(stage.steps for stage in new.stages[:index + 1])
    check(index == len(new.stages) - 1 or end >= step,
          f"{name(index, 'steps')}={new.stages[index].steps} would end stage {index + 1} at step {end}, but the run has "
          f"done {step} steps in it: give it at least {new.stages[index].steps + step - end} steps")
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {before!r} → {after!r}" for key, before, after in changes)
