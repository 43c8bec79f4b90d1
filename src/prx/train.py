"""The trainer. One training step is :meth:`Trainer.train_step`, readable top to bottom:

    data → caption dropout → text encoding → t, noise, x_t → model predicts x0
    → flow loss (velocity space) → backward → clip → LR warm-up → optimizer step → EMA

Everything else here is bookkeeping around it: set-up, resume, logging, sample grids,
checkpoints, the time limit and clean interruption (Ctrl-C finishes the step, saves, exits).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from prx.checkpoint import checkpoint_config, find_checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from prx.config import Config
from prx.data.shapes import ShapesWorld
from prx.ema import EMA
from prx.errors import CheckpointError, PrxError, TrainingError
from prx.flow import add_noise, flow_loss, sample_timesteps
from prx.images import save_grid
from prx.model import PRX, build_model, count_parameters
from prx.pipeline import Pipeline
from prx.runtime import autocast_dtype, resolve_device, set_threads
from prx.text import TextEncoder


def step_seed(seed: int, step: int) -> int:
    """Randomness of step ``step`` depends only on (seed, step): resume replays it exactly."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def build_optimizer(model: PRX, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PrxError(f"cannot write to run directory '{run_dir}' ({e.strerror}): choose another with --out") from None


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool = False


class Trainer:
    """Trains ``config`` into ``run_dir``.

    ``resume``: None resumes when the run directory has a checkpoint (the same command continues
    a run); True requires one; False refuses to touch a run directory that has one.
    """

    def __init__(self, config: Config, run_dir: str | Path, resume: bool | None = None, log=print):
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.log = log
        self.stop_reason: str | None = None

    # ----------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        exists = has_checkpoint(self.run_dir)
        if self.resume is True and not exists:
            raise CheckpointError(
                f"--resume given but '{self.run_dir}' has no checkpoint: drop --resume to start a new run there"
            )
        if self.resume is False and exists:
            raise CheckpointError(
                f"'{self.run_dir}' already holds a run: resume it (drop the flag that forbids it) or choose --out"
            )
        check_writable(self.run_dir)
        self.resume_from = find_checkpoint(self.run_dir / "checkpoints") if exists else None
        if self.resume_from is not None:
            saved = checkpoint_config(self.resume_from)
            if saved.model != cfg.model and not (cfg.model.text_dim is None and _same_but_text_dim(saved, cfg)):
                raise CheckpointError(
                    f"'{self.run_dir}' holds a run with a different model config: use --out for a new run, "
                    f"or the run's own config ({self.run_dir / 'config.yaml'})"
                )

        set_threads(cfg.train.num_threads)
        self.device = resolve_device(cfg.train.device)
        self.autocast = autocast_dtype(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)

        t = cfg.text
        self.text_encoder = TextEncoder(t.encoder, t.max_length, t.dtype, self.device, t.cache_size)
        if cfg.model.text_dim is None:
            cfg.model.text_dim = self.text_encoder.dim
        elif cfg.model.text_dim != self.text_encoder.dim:
            raise PrxError(
                f"model.text_dim={cfg.model.text_dim} but text encoder '{t.encoder}' gives {self.text_encoder.dim}: "
                f"remove model.text_dim (it is set from the encoder)"
            )
        self.model = build_model(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.update_every, cfg.ema.warmup)
        self.data = ShapesWorld(
            cfg.data.resolution, cfg.data.shapes.seed, "train", cfg.data.shapes.object_count_weights
        )
        self.step = 0
        self.bad_steps = 0
        if self.resume_from is not None:
            self.load(self.resume_from)
        cfg.save(self.run_dir / "config.yaml")

    # ----------------------------------------------------------------------------------------
    # The training step
    # ----------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg, dev = self.config, self.device
        batch = cfg.train.batch_size
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))

        # Data: the step's own slice of the (procedural) stream.
        images, captions = self.data.batch(range(step * batch, (step + 1) * batch))
        x0 = images.to(dev)

        # Caption dropout: the empty caption's encoding teaches the unconditional model for CFG.
        drop = torch.rand(batch, generator=gen) < cfg.data.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        text = self.text_encoder.encode(captions).to(dev)

        # Noise: x_t = (1 − t)·x0 + t·ε.
        t = sample_timesteps(batch, cfg.objective, gen).to(dev)
        noise = (torch.randn(x0.shape, generator=gen) * cfg.objective.noise_scale).to(dev)
        x_t = add_noise(x0, noise, t)

        # The model predicts x0; the loss is the MSE of the implied velocities.
        with torch.autocast(dev.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.model(x_t, t, text.embeds, text.mask)
        loss = flow_loss(out.x0, x0, x_t, t, cfg.objective.t_clamp)

        lr = lr_at(step, cfg.optimizer.lr, cfg.optimizer.warmup_steps)
        if not torch.isfinite(loss):
            return self._skip(loss, lr)
        loss.backward()
        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not torch.isfinite(grad_norm):
            return self._skip(grad_norm, lr)

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model, step + 1)
        return StepResult(loss.item(), grad_norm.item(), lr)

    def _skip(self, value: torch.Tensor, lr: float) -> StepResult:
        """A non-finite loss or gradient: drop the update, count it, stop if it keeps happening."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        if self.bad_steps > self.config.train.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} steps had a non-finite loss or gradient (limit train.max_bad_steps="
                f"{self.config.train.max_bad_steps}): lower optimizer.lr or raise optimizer.warmup_steps, "
                f"then resume from {self.run_dir / 'checkpoints' / 'latest'}"
            )
        return StepResult(float(value), float("nan"), lr, skipped=True)

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "ema": self.ema.state_dict(),
            "trainer": {"step": self.step, "bad_steps": self.bad_steps},
            "rng": {"torch": torch.get_rng_state()},
        }

    def load(self, path: Path) -> None:
        state = self.state_dict()
        load_checkpoint(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["trainer"]["step"])
        self.bad_steps = int(state["trainer"]["bad_steps"])
        torch.set_rng_state(state["rng"]["torch"])

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.state_dict(), self.config, self.config.train.keep_checkpoints)

    # ----------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------

    def sample_grid(self) -> Path | None:
        prompts = self.config.logging.sample_prompts
        if not prompts:
            return None
        pipe = Pipeline(self.ema.model, self.text_encoder, self.config, self.device)
        images = pipe.generate(prompts, steps=self.config.logging.sample_steps).numpy()
        out = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, prompts, ncol=min(8, len(prompts)))
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(out)), self.step, dataformats="HWC")
        return out

    def _open_writer(self):
        if not self.config.logging.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step)

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to ``train.steps``; returns the newest checkpoint (also ``RUN/checkpoints/latest``)."""
        self.setup()
        cfg = self.config
        total = cfg.train.steps
        n_params = count_parameters(self.model)
        where = f"resuming {self.resume_from} at step {self.step}" if self.resume_from else "new run"
        self.log(
            f"prx: {cfg.name} | {where} | {n_params / 1e6:.2f}M params | {cfg.data.resolution}px, "
            f"batch {cfg.train.batch_size}, {total} steps | {self.device}"
            f"{', bf16 autocast' if self.autocast else ', fp32'} | run dir {self.run_dir}"
        )
        self.writer = self._open_writer()
        if self.step >= total:
            return self._finish("already complete")

        self._install_interrupt_handler()
        start_time = time.monotonic()
        limit = cfg.train.time_limit_minutes * 60
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not cfg.logging.progress_bar, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        window, window_start, window_steps = [], time.monotonic(), 0
        try:
            while self.step < total:
                result = self.train_step(self.step)
                self.step += 1
                bar.update(1)
                window_steps += 1
                if not result.skipped:
                    window.append(result.loss)
                if self.step % cfg.logging.log_every == 0 or self.step == total:
                    elapsed = time.monotonic() - window_start
                    loss = sum(window) / max(len(window), 1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.1e}", refresh=False)
                    if self.writer is not None:
                        self.writer.add_scalar("loss/train", loss, self.step)
                        self.writer.add_scalar("train/grad_norm", result.grad_norm, self.step)
                        self.writer.add_scalar("train/lr", result.lr, self.step)
                        self.writer.add_scalar("train/steps_per_s", window_steps / elapsed, self.step)
                        self.writer.add_scalar("train/images_per_s", window_steps * cfg.train.batch_size / elapsed, self.step)
                        self.writer.add_scalar("train/bad_steps", self.bad_steps, self.step)
                        self.writer.add_scalar("train/ema_decay", self.ema.current_decay(), self.step)
                    window, window_start, window_steps = [], time.monotonic(), 0
                if self.step % cfg.train.checkpoint_every == 0 and self.step < total:
                    self.save()
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.step < total:
                    self.sample_grid()
                if limit and time.monotonic() - start_time > limit:
                    self.stop_reason = f"time limit of {cfg.train.time_limit_minutes:g} min reached"
                if self.stop_reason:
                    break
        finally:
            bar.close()
            self._restore_interrupt_handler()
        if self.stop_reason is None:
            grid = self.sample_grid() if cfg.logging.sample_every else None
            if grid is not None:
                self.log(f"samples: {grid}")
        return self._finish(self.stop_reason or "done")

    def _finish(self, reason: str) -> Path:
        path = self.save() if not (self.resume_from and self.step == _checkpoint_step(self.resume_from)) else self.resume_from
        if self.writer is not None:
            self.writer.close()
        if self.bad_steps:
            self.log(f"warning: {self.bad_steps} steps were skipped for non-finite loss or gradients")
        self.log(f"{reason} at step {self.step}/{self.config.train.steps}")
        self.log(f"checkpoint: {self.run_dir / 'checkpoints' / 'latest'} -> {path.name}")
        return path

    def _install_interrupt_handler(self) -> None:
        def on_interrupt(signum, frame):
            if self.stop_reason == "interrupted":  # second Ctrl-C: stop now, the last checkpoint stays intact
                raise KeyboardInterrupt
            self.stop_reason = "interrupted"
            print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr)

        try:
            self._old_handler = signal.signal(signal.SIGINT, on_interrupt)
        except ValueError:  # not the main thread
            self._old_handler = None

    def _restore_interrupt_handler(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGINT, self._old_handler)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def _same_but_text_dim(saved: Config, cfg: Config) -> bool:
    """The saved model config equals ours once ours gets the text dim the encoder will give it."""
    from dataclasses import replace

    return replace(saved.model, text_dim=None) == cfg.model
