"""Where a run reports: ``metrics.jsonl`` (one row per logged step), TensorBoard, and a progress
bar. Only rank 0 writes; the others get a logger that does nothing.

After a resume the rows of steps past the checkpoint (written before the interruption) are
dropped when the file is opened, so ``metrics.jsonl`` never holds two rows for one step.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prx.checks import at_least


@dataclass
class LoggingConfig:
    """``logging:`` what the run reports, where, and how often."""

    log_every: int = at_least(10, 1)
    sample_every: int = at_least(1000, 0, hint=" (0 disables)")  # sample grid of the fixed prompts (EMA weights)
    sample_steps: int = at_least(25, 1)
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle in the top left",
            "a blue square in the bottom right",
            "a green triangle in the center",
            "a yellow circle in the top right",
            "a purple square in the bottom left",
            "an orange triangle in the top left",
            "a blue circle to the left of a red square",
            "a green square above an orange circle",
        ]
    )
    tensorboard: bool = True
    progress_bar: bool = True


class RunLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, step: int, total: int, enabled: bool = True, log=print):
        self.cfg, self.enabled, self.print = cfg, enabled, log
        self.window: dict[str, list[float]] = defaultdict(list)
        self.metrics = self.writer = None
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress_bar and enabled), mininterval=1.0 if sys.stderr.isatty() else 30.0)
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():  # a resumed run: forget what was logged after the checkpoint it resumes from
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if 0 <= _step_of(line) <= step]
            if len(kept) != len(rows):
                path.write_text("".join(line + "\n" for line in kept))
        self.metrics = open(path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step)

    def line(self, text: str) -> None:
        """A message that does not break the progress bar."""
        if self.enabled and not self.bar.disable:
            self.bar.write(text)
        elif self.enabled:
            self.print(text)

    def add(self, values: dict[str, float]) -> None:
        """One step's losses, averaged over the steps until the next :meth:`log`."""
        for name, value in values.items():
            self.window[name].append(value)

    def take_window(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.window.items() if v}
        self.window.clear()
        return means

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One row of metrics.jsonl and TensorBoard scalars (names like ``loss/flow``, ``train/lr``)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line from a crash: dropped


def sample_sizes(data_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (width, height) sizes a sample grid shows: the data's most common bucket and the most
    common one of another aspect ratio (preferring the other orientation), when the data has one."""
    first = data_sizes[0]
    others = [s for s in data_sizes[1:] if s[0] * first[1] != s[1] * first[0]]
    flipped = [s for s in others if (s[0] > s[1]) != (first[0] > first[1]) and s[0] != s[1]]
    return [first] + (flipped or others)[:1]


def sample_in_sizes(pipe, prompts: list[str], sizes: list[tuple[int, int]], steps: int, seed: int) -> list:
    """uint8 images of ``prompts``, prompt i in ``sizes[i % len(sizes)]``: a grid's aspect ratios."""
    images = [None] * len(prompts)
    for k, (width, height) in enumerate(sizes):
        rows = list(range(k, len(prompts), len(sizes)))
        out = pipe.generate([prompts[i] for i in rows], steps=steps, width=width, height=height,
                            seed=seed + k * len(prompts)).numpy()
        for i, image in zip(rows, out):
            images[i] = image
    return images

