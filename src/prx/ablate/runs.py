"""The ablation's runs: what one ``prx ablate`` command asks for (:class:`Settings`), one arm with one seed
(:class:`ArmRun`), and each arm's record ``RUN/ablate.json``: the config it was asked for and, once measured, its
results and the prx commit and hardware that trained it.

The runner writes these records and the report reads them; neither imports the other's module for them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prx.ablate.arms import Arm
from prx.ablate.budget import Budget, flops_until
from prx.checkpoint import has_checkpoint
from prx.config import Config
from prx.errors import PrxError

STATE = "ablate.json"  # in each arm's run directory
# config keys that say where or how fast an arm runs, not what it trains: left out of its fingerprint
NOT_FINGERPRINTED = ("name", "eval.data", "train.device", "train.num_threads", "logging.progress_bar")


@dataclass
class Settings:
    """What one ``prx ablate`` command asks for."""

    config: str
    out: Path
    arms: list[Arm]
    seeds: list[int]
    budget: Budget
    overrides: list[str] = field(default_factory=list)  # for every arm, before the arm's own
    points: int = 10  # evaluations (and checkpoints) per arm: the validation curve's points
    eval_samples: int = 1000
    judge_prompts: int = 0  # prompts per judge set (0: all of them)
    image_metrics: bool = True
    heldout: str | None = None
    parallel_arms: bool = False
    report_only: bool = False  # write the report of the arms finished so far; train nothing
    dry_run: bool = False  # print each arm's plan (steps, FLOPs, overrides); train and write nothing
    command: str = ""


@dataclass
class ArmRun:
    """One arm with one seed: its resolved config and run directory."""

    arm: Arm
    seed: int
    config: Config
    overrides: list[str]
    run_dir: Path
    requested: dict  # the config as flat keys, NOT_FINGERPRINTED left out
    stand_ins: set[str]

    @property
    def key(self) -> str:
        return f"{self.arm.name}-s{self.seed}"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.requested, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def planned_flops(self) -> float:
        return flops_until(self.config, self.config.total_steps)


def flat(data: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {'train': {'steps': 6}} → {'train.steps': 6}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# An arm's record: finished, interrupted, or another config
# --------------------------------------------------------------------------------------------


def read_state(run: ArmRun) -> dict | None:
    """The arm's ablate.json (None: never started); an arm directory asked for another config fails here."""
    path = run.run_dir / STATE
    if not path.is_file():
        if has_checkpoint(run.run_dir):
            raise PrxError(f"{run.run_dir} holds a run that prx ablate did not start: move it away or use another "
                           f"--out")
        return None
    state = json.loads(path.read_text())
    if state["fingerprint"] != run.fingerprint:
        old = state.get("config", {})
        defaults = flat(Config().to_dict())  # a key a later prx added: the arm ran with its default
        changed = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in run.requested.items()
                   if (old[k] if k in old else defaults.get(k, v)) != v]
        changed += [f"{k}: {old[k]!r} → (none)" for k in old if k not in run.requested]
        if not changed:
            return state
        what = "; ".join(changed[:4])
        raise PrxError(f"arm {run.key} in {run.run_dir} was run with another config ({what}): use another --out, "
                       f"or repeat the command that started it")
    return state


def write_state(run: ArmRun, **fields) -> dict:
    state = {"arm": run.arm.name, "seed": run.seed, "description": run.arm.description,
             "arm_overrides": list(run.arm.overrides), "overrides": run.overrides, "fingerprint": run.fingerprint,
             "stand_ins": sorted(run.stand_ins), "config": run.requested, "result": None, **fields}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.run_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, run.run_dir / STATE)
    return state


def finished(run: ArmRun) -> dict | None:
    state = read_state(run)
    return state if state and state.get("result") else None


def environment() -> dict:
    """Date, prx commit, hardware (CPU model, AVX-512 / AMX, cores; the GPU if any), torch version."""
    flags, model = set(), platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name") and ":" in line:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
    isa = ", ".join(name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags)
    isa = isa or "no AVX-512/AMX"
    hardware = f"{model} ({os.cpu_count()} cores, {isa})"
    if torch.cuda.is_available():
        hardware += f", {torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "hardware": hardware,
            "torch": torch.__version__.split("+")[0]}
