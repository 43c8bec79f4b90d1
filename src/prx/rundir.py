"""A run directory, the one place that names its files::

    RUN/config.yaml               the config the run was started (or last resumed) with: `prx train RUN/config.yaml`
    RUN/execution.json            how the last start executes (prx.execution.ExecutionPlan)
    RUN/.lock                     held (flock) by the training that writes the run (prx.lifecycle.RunLock)
    RUN/checkpoints/step_N/       checkpoints (prx.checkpoint); RUN/checkpoints/latest -> the newest
    RUN/metrics.jsonl             one row per logged step; RUN/tensorboard/ its event files; RUN/wandb_id
    RUN/samples/step_N.png        sample grids
    RUN/eval/step_N/              `prx eval` (the shapes world's judge); RUN/eval/step_N/real/ held-out metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int:
    """The optimizer step a checkpoint (or eval) directory holds, from its name."""
    return int(Path(path).name.split("_")[1])


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunDir":
        """The run a checkpoint directory belongs to (RUN/checkpoints/step_N → RUN); a checkpoint outside a run's
        ``checkpoints/`` (a copy) is its own run directory's parent."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def execution(self) -> Path:
        return self.root / "execution.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"

    def sample_grid(self, step: int) -> Path:
        return self.root / "samples" / f"{step_dir_name(step)}.png"

    def eval_dir(self, step: int) -> Path:
        """``prx eval``'s results of the shapes world at ``step``."""
        return self.root / "eval" / step_dir_name(step)

    def real_eval_dir(self, step: int) -> Path:
        """Held-out metrics (``prx eval --data``, ``eval:`` during training) at ``step``."""
        return self.eval_dir(step) / "real"

    def eval_results(self, real: bool = False) -> list[Path]:
        """Every ``results.json`` of the shapes world's evaluations (or, ``real``, of the held-out ones)."""
        return sorted((self.root / "eval").glob("*/real/results.json" if real else "*/results.json"))


def inside_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory ``path`` lies in (or is), or the ``checkpoints/`` directory of a run it is or lies in
    (one with a ``latest`` link or a complete checkpoint): only the trainer writes there."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, *path.parents):
        if candidate.parent.name == CHECKPOINTS and candidate.name.startswith(("step_", ".tmp_step_")):
            return candidate
        if candidate.name == CHECKPOINTS and ((candidate / LATEST).is_symlink() or any(
                (p / "meta.json").is_file() for p in candidate.glob("step_*"))):
            return candidate
    return None
