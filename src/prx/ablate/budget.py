"""What every arm of an ablation gets: the same steps, the same FLOPs or the same wall time.

Equal FLOPs use prx's own count (:func:`prx.flops.step_flops`: the denoiser with its routing, 3× a
forward pass, every teacher's passes, Muon's Newton–Schulz), so an arm whose steps are cheaper
(TREAD routes half the tokens; no perceptual nets) trains more of them. A budget becomes step
counts as config overrides: a staged config keeps the proportions of its stages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prx.errors import ConfigError
from prx.flops import fmt_flops, step_flops

_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}


@dataclass(frozen=True)
class Budget:
    kind: str  # steps | flops | minutes | config (the config's own steps)
    value: float = 0.0

    def describe(self) -> str:
        return {"steps": f"equal steps ({int(self.value)} optimizer steps per arm)",
                "config": "equal steps (the config's own step count in every arm)",
                "flops": f"equal compute ({fmt_flops(self.value)} per arm by prx.flops.step_flops: the denoiser with "
                         f"its routing, the teachers, Muon's Newton–Schulz; cheaper steps buy more of them)",
                "minutes": f"equal wall time ({self.value:g} min of training per arm)"}[self.kind]


def parse_flops(text: str) -> float:
    """'2.5e15', '2.5P', '300TFLOP', '40 GFLOPs' → FLOPs."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([kmgtpe]?)(?:flops?)?\s*", text.strip().lower())
    if not m:
        raise ConfigError(f"--budget-flops '{text}' is not a FLOP count: write e.g. 2.5e15, 2.5P or 300TFLOP")
    try:
        return float(m.group(1)) * _SI[m.group(2)]
    except ValueError:
        raise ConfigError(f"--budget-flops '{text}' is not a FLOP count: write e.g. 2.5e15, 2.5P or 300TFLOP") from None


def parse_budget(steps: int | None, flops: str | None, minutes: float | None) -> Budget:
    given = [(k, v) for k, v in (("--budget-steps", steps), ("--budget-flops", flops), ("--budget-minutes", minutes))
             if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one budget, not {' and '.join(k for k, _ in given)}: every arm gets the same steps, "
                          f"FLOPs or minutes")
    if not given:
        return Budget("config")
    key, value = given[0]
    number = parse_flops(value) if key == "--budget-flops" else float(value)
    if not number > 0 or not math.isfinite(number):
        raise ConfigError(f"{key} {value} must be a positive number")
    return Budget(key.removeprefix("--budget-"), number)


def stage_step_flops(cfg) -> list[float]:
    """FLOPs of one optimizer step in each stage of ``cfg``, all parts summed."""
    return [sum(step_flops(cfg, stage).values()) for stage in cfg.stages]


def flops_until(cfg, step: int, per_step: list[float] | None = None) -> float:
    """FLOPs of the first ``step`` optimizer steps of ``cfg``."""
    per_step = per_step or stage_step_flops(cfg)
    total, start = 0.0, 0
    for stage, flops in zip(cfg.stages, per_step):
        total += max(0, min(step, start + stage.steps) - start) * flops
        start += stage.steps
    return total


def split_steps(cfg, total: int) -> list[int]:
    """``total`` steps split over the stages in the proportions of their configured steps (each ≥ 1)."""
    weights = [stage.steps for stage in cfg.stages]
    if total < len(weights):
        raise ConfigError(f"a budget of {total} steps cannot cover the config's {len(weights)} stages: raise it")
    shares = [total * w / sum(weights) for w in weights]
    counts = [max(1, int(s)) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[:max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def step_overrides(cfg, total: int) -> list[str]:
    """Overrides that make ``cfg`` train ``total`` steps (a staged config: split over its stages)."""
    if not cfg.train.stages:
        return [f"train.steps={total}"]
    return [f"train.stages[{i}].steps={n}" for i, n in enumerate(split_steps(cfg, total))]


def budget_overrides(cfg, budget: Budget) -> list[str]:
    """The overrides that give ``cfg`` (an arm's config) its share of ``budget``. Steps and FLOPs budgets turn the
    config's own time budget and time limit off: they would end arms at different points."""
    if budget.kind == "minutes":
        if cfg.train.stages:
            raise ConfigError("--budget-minutes sets the step count through train.time_budget_minutes, which needs a "
                              "single-stage config: use --budget-flops or --budget-steps, or override train.stages")
        return [f"train.time_budget_minutes={budget.value:g}", "train.steps=1000000000",
                f"train.time_limit_minutes={1.5 * budget.value:g}"]
    fixed = ["train.time_budget_minutes=0", "train.time_limit_minutes=0"]
    if budget.kind == "config":
        return fixed
    if budget.kind == "steps":
        return fixed + step_overrides(cfg, int(budget.value))
    weights = [stage.steps for stage in cfg.stages]  # the stages' share of each step of the budget
    per_unit = sum(w * f for w, f in zip(weights, stage_step_flops(cfg))) / sum(weights)
    total = max(len(weights), int(budget.value // per_unit))
    return fixed + step_overrides(cfg, total)
