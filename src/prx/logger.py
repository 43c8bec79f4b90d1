"""Where a run reports: ``metrics.jsonl`` (one row per logged step), TensorBoard, Weights & Biases
(``logging.wandb``) and a progress bar. Only rank 0 writes (and talks to W&B); the others get a
logger that does nothing.

After a resume the rows of steps past the checkpoint (written before the interruption) are
dropped when the file is opened, so ``metrics.jsonl`` never holds two rows of one kind for one step
(evaluations, ``eval/*``, have rows of their own).

W&B: the run's id is kept in ``RUN/wandb_id``, so a resumed run continues the same W&B run
(``wandb.init(id=..., resume="allow")``); a run that starts from step 0 gets a new id. ``wandb`` is
an optional extra, checked before any work (:func:`require_wandb`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import string
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from prx.config.run import LoggingConfig
from prx.distributed import mean_across_ranks
from prx.errors import PrxError
from prx.hub import unreachable
from prx.images import save_grid
from prx.rundir import RunDir


def require_wandb(cfg: LoggingConfig) -> None:
    """With ``logging.wandb: true``, a one-line error unless wandb can be imported and, online, its server answers
    (call before any work: with no network ``wandb.init`` retries for minutes before it gives up)."""
    if not cfg.wandb:
        return
    try:
        wandb = importlib.import_module("wandb")
    except ImportError:
        raise PrxError("logging.wandb is true but wandb is not installed: pip install wandb (or pip install -e "
                       "'.[wandb]' in the prx checkout), or set logging.wandb=false") from None
    mode, base = _wandb_server(wandb)
    if (cfg.wandb_mode or mode) in ("online", "run"):
        if (reason := unreachable(base)) is not None:
            raise PrxError(f"W&B could not start: {base} cannot be reached ({reason}): check the network, or set "
                           f"logging.wandb_mode=offline (then `wandb sync` later), or logging.wandb=false")


def _wandb_server(wandb) -> tuple[str, str]:
    """(mode, server URL) as ``wandb.init`` will take them: its settings file (``wandb login --host``), then the
    environment (``WANDB_MODE``, ``WANDB_BASE_URL``)."""
    try:
        from wandb.sdk.wandb_settings import Settings

        settings = Settings(quiet=True)
        settings.settings_system = str(Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
                                       / "settings")
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        return str(settings.mode), str(settings.base_url)
    except Exception:  # noqa: BLE001 - another wandb version: its defaults and the environment
        base = os.environ.get("WANDB_BASE_URL") or getattr(wandb.Settings(), "base_url", None) or "https://api.wandb.ai"
        return os.environ.get("WANDB_MODE") or "online", base


def start_wandb(cfg: LoggingConfig, run: RunDir, step: int, run_config: dict | None):
    """The W&B run of this run directory: the id in ``RUN/wandb_id`` when resuming (step > 0), else a
    new one (written before W&B starts, so an interrupted first attempt resumes into it)."""
    import wandb

    run_dir, id_file = run.root, run.wandb_id
    run_id = id_file.read_text().strip() if step > 0 and id_file.is_file() else ""
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    kwargs = dict(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name or run_dir.resolve().name,
                  id=run_id, resume="allow", config=run_config,
                  dir=None if os.environ.get("WANDB_DIR") else str(run_dir))  # W&B's files: RUN/wandb/ by default
    if cfg.wandb_mode is not None:
        kwargs["mode"] = cfg.wandb_mode
    try:
        return wandb.init(**kwargs)
    except Exception as e:  # not logged in, no network, a bad entity: one line, before step 0
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PrxError(f"W&B could not start ({detail}): run `wandb login`, or set logging.wandb_mode=offline "
                       f"(then `wandb sync` later), or logging.wandb=false") from None


class RunLogger:
    def __init__(self, cfg: LoggingConfig, run: RunDir, step: int, total: int, enabled: bool = True, log=print,
                 run_config: dict | None = None):
        self.cfg, self.enabled, self.print, self.run = cfg, enabled, log, run
        self.window: dict[str, list[float]] = defaultdict(list)
        self.window_start, self.window_steps = time.monotonic(), 0  # the steps/s of the next logged step
        self.metrics = self.writer = self.wandb = None
        if enabled and cfg.wandb:  # first: a W&B that cannot start stops the run before anything is opened
            self.wandb = start_wandb(cfg, run, step, run_config)
        self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress_bar and enabled), mininterval=1.0 if sys.stderr.isatty() else 30.0)
        if not enabled:
            return
        path = run.metrics
        if path.exists():  # a resumed run: forget what was logged after the checkpoint it resumes from
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if 0 <= _step_of(line) <= step]
            if len(kept) != len(rows):
                path.write_text("".join(line + "\n" for line in kept))
        self.metrics = open(path, "a")
        if cfg.tensorboard:
            # after a resume, TensorBoard hides what was logged past the checkpoint (as metrics.jsonl drops it);
            # the checkpoint's own step stays (TensorBoard discards steps ≥ purge_step)
            self.writer = SummaryWriter(str(run.tensorboard), purge_step=step + 1 if step else 0)

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

    def step_done(self, losses: dict[str, float] | None) -> None:
        """A training step finished: its losses (None: a skipped step) join the next logged step's means."""
        self.window_steps += 1
        if losses is not None:
            self.add(losses)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (an evaluation) does not count in the next logged step's steps/s."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.window_start += time.monotonic() - start

    def log_step(self, step: int, batch_size: int, dist, scalars: dict[str, float]) -> None:
        """The window's mean losses over every rank (a collective: every rank calls it), its steps/s and images/s,
        and ``scalars``: a row of metrics.jsonl, TensorBoard and W&B, and the progress bar's postfix."""
        means = mean_across_ranks(self.take_window(), dist)
        steps_per_s = self.window_steps / max(time.monotonic() - self.window_start, 1e-9)
        self.window_start, self.window_steps = time.monotonic(), 0
        self.bar.set_postfix(loss=f"{means.get('total', float('nan')):.4f}", lr=f"{scalars.get('lr', 0.0):.1e}",
                             refresh=False)
        self.log(step, {**{f"loss/{k}": v for k, v in means.items()}, **scalars, "train/steps_per_s": steps_per_s,
                        "train/images_per_s": steps_per_s * batch_size})

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
        values = {name: value for name, value in scalars.items() if value is not None}  # an empty bin: null
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        self._wandb_log(values, step)

    def sample_grid(self, pipe, data_sizes: list[tuple[int, int]], step: int, seed: int) -> Path | None:
        """``logging.sample_prompts`` sampled with ``pipe`` in the data's two most common bucket shapes
        (square and wide, say), alternating over the prompts; every rank samples (FSDP gathers the
        weights), rank 0 writes the grid. None without prompts."""
        prompts = self.cfg.sample_prompts
        if not prompts:
            return None
        images = sample_in_sizes(pipe, prompts, sample_sizes(data_sizes), self.cfg.sample_steps, seed)
        return self.grid(images, prompts, step) if self.enabled else None

    def grid(self, images: list, prompts: list[str], step: int) -> Path:
        """A sample grid: ``RUN/samples/step_N.png``, TensorBoard and W&B."""
        out = self.run.sample_grid(step)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, prompts, ncol=min(8, len(prompts)))
        self.image("samples", out, step)
        return out

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.writer is not None:
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self._wandb_log({tag: wandb.Image(str(path))}, step)

    def _wandb_log(self, values: dict, step: int) -> None:
        # W&B drops (with a warning each) what is logged below its current step: after a resume, the
        # steps it already has from before the interruption (a resumed run reproduces them exactly)
        if self.wandb is not None and values and step >= self.wandb.step:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
            self.wandb = None
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

