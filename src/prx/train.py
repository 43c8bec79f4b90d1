"""The trainer. One training step is :meth:`Trainer.train_step`, readable top to bottom:

    data → caption dropout → t, noise → TREAD route → for each micro-batch:
        text encoding → x_t → model predicts x0 (and the REPA block's hidden state)
        → flow loss + perceptual losses + REPA → backward
    → clip → LR schedule → Muon/Adam step → EMA

Each trick of the recipe is a small module the step calls explicitly (``TREADRouter``,
``REPAAlignment``, ``PerceptualLoss``); a run is a list of resolution stages that switch them on
and off. Everything else here is bookkeeping: set-up, resume, logging, sample grids, checkpoints,
the time limit and clean interruption (Ctrl-C finishes the step, saves, exits).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

from prx.checkpoint import CheckpointWriter, checkpoint_config, find_checkpoint, has_checkpoint, load_checkpoint
from prx.config import (Config, PerceptualConfig, REPAConfig, StageConfig, TreadConfig, model_config_from_dict,
                        validate)
from prx.data.sources import build_source
from prx.distributed import (all_agree, apply_ddp, apply_fsdp, compile_blocks, full_value, init_distributed,
                             mean_across_ranks, resolve_parallel)
from prx.ema import EMA
from prx.errors import CheckpointError, ConfigError, PrxError, TrainingError
from prx.flow import add_noise, flow_loss, sample_timesteps
from prx.images import save_grid
from prx.model import PRX, build_model, count_parameters
from prx.optim import MultiOptimizer, build_optimizer, param_groups_from_config
from prx.perceptual import PerceptualLoss
from prx.pipeline import Pipeline
from prx.repa import REPAAlignment
from prx.runtime import autocast_dtype, make_writable_dir, resolve_device, set_threads
from prx.text import TextBatch, TextEncoder
from prx.tread import TREADRouter


def step_seed(seed: int, step: int) -> int:
    """Randomness of step ``step`` depends only on (seed, step): resume replays it exactly."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def sample_noise(shape: tuple[int, ...], seed: int, step: int, first: int, device: torch.device) -> torch.Tensor:
    """Noise of samples first, first+1, … of the step's global batch, each from its own generator:
    a rank draws only its own samples, and the draws do not depend on the world size."""
    out = []
    for i in range(shape[0]):
        g = torch.Generator(device=device).manual_seed(step_seed(seed, step) ^ ((first + i + 1) * 0x9E3779B97F4A7C15 % 2**62))
        out.append(torch.randn(shape[1:], generator=g, device=device))
    return torch.stack(out)


def lr_scale(step: int, total_steps: int, cfg) -> float:
    """Linear warm-up, constant, then (optionally) a linear decay over the last ``decay_fraction``."""
    scale = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    decay_steps = int(round(cfg.decay_fraction * total_steps))
    if decay_steps > 0 and step >= total_steps - decay_steps:
        progress = (step - (total_steps - decay_steps) + 1) / decay_steps
        scale *= 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return scale


@dataclass
class StepResult:
    loss: float
    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")
    lr: float = 0.0
    skipped: bool = False


def config_from_components(model, router, repa, perceptual_loss, param_groups, batch_size, steps_512, steps_1024,
                           batch_size_1024) -> Config:
    """The config that mirrors a run assembled in Python (the seed's API), for checkpoints and plans."""
    cfg = Config(name="seed")
    cfg.model = model.config if isinstance(model, PRX) else model_config_from_dict(model)
    if batch_size is None or (steps_512 is None and steps_1024 is None):
        raise ConfigError("Trainer(model=...) needs batch_size and steps_512 and/or steps_1024")
    stages = []
    if steps_512:
        stages.append(StageConfig(resolution=512, steps=steps_512, batch_size=batch_size))
    if steps_1024:  # the recipe's second stage: half the batch, REPA off
        stages.append(StageConfig(resolution=1024, steps=steps_1024, batch_size=batch_size_1024 or max(1, batch_size // 2),
                                  repa=False))
    cfg.train.stages = stages
    cfg.train.batch_size, cfg.train.steps, cfg.data.resolution = stages[0].batch_size, sum(s.steps for s in stages), stages[0].resolution
    cfg.tread = (TreadConfig(router.route_ratio, router.start_block, router.end_block) if router
                 else TreadConfig(route_ratio=0.0))
    cfg.sampling.guidance = "self" if router else "cfg"
    cfg.repa = (REPAConfig(repa.teacher_name, repa.loss_weight, repa.apply_at_block, repa.projector_dim) if repa
                else REPAConfig(weight=0.0))
    cfg.perceptual = (PerceptualConfig(perceptual_loss.lpips_weight, perceptual_loss.dino_weight, perceptual_loss.t_threshold,
                                       perceptual_loss.dino_model_name, perceptual_loss.dino_resolution,
                                       perceptual_loss.lpips_resize, perceptual_loss.lpips_vgg_weights,
                                       perceptual_loss.lpips_heads)
                      if perceptual_loss else PerceptualConfig(lpips_weight=0.0, dino_weight=0.0))
    if param_groups is not None:
        kinds = {str(g.get("optimizer", "adam")).lower() for g in param_groups}
        cfg.optimizer.name = "muon" if "muon" in kinds else "adamw"
        cfg.optimizer.lr = float(param_groups[0].get("lr", cfg.optimizer.lr))
    validate(cfg)
    return cfg


class NoTimer:
    """The step's phase timer when nobody is measuring: free."""

    def __call__(self, phase: str):
        return contextlib.nullcontext()


class Trainer:
    """Trains a run into ``run_dir``, from a :class:`Config` or from components (the seed's API)::

        Trainer(model=PRX({...}) or {...}, router=TREADRouter(), repa=REPAAlignment(),
                perceptual_loss=PerceptualLoss(), param_groups=[...], batch_size=..., steps_512=...,
                steps_1024=...).run()

    ``resume``: None resumes when the run directory has a checkpoint (the same command continues
    a run); True requires one; False refuses to touch a run directory that has one.
    """

    def __init__(self, config: Config | None = None, run_dir: str | Path | None = None, resume: bool | None = None, *,
                 model: PRX | dict | None = None, router: TREADRouter | None = None, repa: REPAAlignment | None = None,
                 perceptual_loss: PerceptualLoss | None = None, param_groups: list[dict] | None = None,
                 batch_size: int | None = None, steps_512: int | None = None, steps_1024: int | None = None,
                 batch_size_1024: int | None = None, text_encoder: TextEncoder | None = None, log=print):
        if config is None:
            if model is None:
                raise ConfigError("Trainer needs a config or a model")
            config = config_from_components(model, router, repa, perceptual_loss, param_groups, batch_size,
                                            steps_512, steps_1024, batch_size_1024)
        elif model is not None and not isinstance(model, PRX):
            model = PRX(model_config_from_dict(model))
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.name
        self.resume = resume
        self.log = log
        self.stop_reason: str | None = None
        self.timer = NoTimer()  # `prx bench` swaps in a timer that records each phase of the step
        self._given = dict(model=model if isinstance(model, PRX) else (PRX(config.model) if model is not None else None),
                           router=router, repa=repa, perceptual=perceptual_loss, param_groups=param_groups,
                           text_encoder=text_encoder)
        self._old_handler = None

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
        make_writable_dir(self.run_dir, "run directory")
        set_threads(cfg.train.num_threads)
        self.dist = init_distributed(resolve_device(cfg.train.device), cfg.train.timeout_minutes)
        self.device = self.dist.device
        self.resume_from = find_checkpoint(self.run_dir / "checkpoints") if exists else None
        if self.resume_from is not None:
            saved = checkpoint_config(self.resume_from)
            cfg.model.norm_eps = saved.model.norm_eps  # the weights' own (1e-5 in runs from before the option)
            shape = dict(text_dim=None, init_from=None)  # init_from says how a run started, not what it is
            if replace(saved.model, **shape) != replace(cfg.model, **shape) or (
                    cfg.model.text_dim is not None and saved.model.text_dim != cfg.model.text_dim):
                raise CheckpointError(
                    f"'{self.run_dir}' holds a run with a different model config: use --out for a new run, "
                    f"or the run's own config ({self.run_dir / 'config.yaml'})"
                )

        self.autocast = autocast_dtype(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        given = self._given

        t = cfg.text
        self.text_encoder = given["text_encoder"] or TextEncoder(t.encoder, t.max_length, t.dtype, self.device, t.cache_size)
        if cfg.model.text_dim is None:
            cfg.model.text_dim = self.text_encoder.dim
        if cfg.model.text_dim != self.text_encoder.dim:
            raise PrxError(
                f"the model takes {cfg.model.text_dim}-wide text tokens but text encoder '{t.encoder}' gives "
                f"{self.text_encoder.dim}: set model.text_dim={self.text_encoder.dim} (or leave it unset in a config)"
            )
        self.model = (given["model"] or build_model(cfg.model)).to(self.device)
        if cfg.model.init_from and self.resume_from is None:  # fine-tuning: a new run starts from diffusers weights
            from prx.diffusers_io import load_init_weights

            message = load_init_weights(self.model, cfg.model.init_from)
            if self.dist.is_main:
                self.log(message)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.update_every, cfg.ema.warmup)  # a copy, before sharding
        # Parallelism: FSDP2 shards the model (and the EMA, alike) in place; DDP wraps it for training.
        self.parallel = resolve_parallel(cfg.train.parallel, self.dist)
        names_before = {id(param): name for name, param in self.model.named_parameters()}
        if self.parallel == "fsdp":
            apply_fsdp(self.model, self.dist, self.autocast)
            apply_fsdp(self.ema.model, self.dist, self.autocast)
        if cfg.train.compile == "on" or (cfg.train.compile == "auto" and self.device.type == "cuda"):
            compile_blocks(self.model)
        self.forward_model = apply_ddp(self.model, self.dist) if self.parallel == "ddp" else self.model

        # The recipe's tricks, each a small module; teachers load now so a missing one fails before step 0.
        teacher_dtype = self.autocast or torch.float32
        self.router = given["router"] or (
            TREADRouter(cfg.tread.route_ratio, cfg.tread.start_block, cfg.tread.end_block, seed=cfg.train.seed)
            if cfg.tread.route_ratio > 0 else None)
        if self.router is not None:
            self.router.blocks(cfg.model.num_layers)  # a bad block range fails here
        self.repa = given["repa"] or (
            REPAAlignment(cfg.repa.teacher, cfg.repa.weight, cfg.repa.block, cfg.repa.projector_dim)
            if cfg.repa.weight > 0 else None)
        if self.repa is not None:
            self.repa.setup(cfg.model.hidden_dim, cfg.model.num_layers, dtype=teacher_dtype).to(self.device)
        p = cfg.perceptual
        self.perceptual = given["perceptual"] or (
            PerceptualLoss(p.lpips_weight, p.dino_weight, True, p.t_threshold, p.dino_model, p.dino_resolution,
                           p.lpips_resize, p.lpips_vgg_weights, p.lpips_heads)
            if p.lpips_weight > 0 or p.dino_weight > 0 else None)
        if self.perceptual is not None:
            self.perceptual.load(teacher_dtype).to(self.device)

        # Everything the optimizer updates, for checkpoints: the denoiser and the REPA projector.
        self.trainable = nn.ModuleDict({"denoiser": self.model})
        if self.repa is not None:
            self.trainable["repa_projector"] = self.repa.projector
            # the projector trains too: its gradients are synchronised like the denoiser's
            if self.parallel == "fsdp":
                apply_fsdp(self.repa.projector, self.dist, self.autocast)
            elif self.parallel == "ddp":
                self.repa.projector = apply_ddp(self.repa.projector, self.dist)
        groups = given["param_groups"] or param_groups_from_config(self.model, cfg.optimizer)
        if given["param_groups"] is not None:  # built from the model before sharding: point at its parameters now
            current = dict(self.model.named_parameters())
            groups = [{**g, "params": [current[names_before[id(q)]] if id(q) in names_before else q for q in g["params"]]}
                      for g in groups]
        extra = list(self.trainable["repa_projector"].parameters()) if self.repa is not None else []
        self.optimizer: MultiOptimizer = build_optimizer(groups, extra)
        self.data = build_source(cfg, self.dist.rank, self.dist.world)
        self.checkpoints = CheckpointWriter(self.run_dir, self.dist, cfg.train.keep_checkpoints,
                                            cfg.train.async_checkpoint)
        self.step = 0
        self.bad_steps = 0
        if self.resume_from is not None:
            self.load(self.resume_from)
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.yaml")

    # ----------------------------------------------------------------------------------------
    # The training step
    # ----------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg, dev, rank, world = self.config, self.device, self.dist.rank, self.dist.world
        stage_index, stage = cfg.stage_at(step)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
        if stage.batch_size % world:
            raise TrainingError(f"the batch size {stage.batch_size} does not split over {world} ranks: use a multiple")
        per_rank = stage.batch_size // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's share of the global batch

        with self.timer("data"):
            data = self.data.batch(step, stage_index, stage)  # this rank's samples of the step
        images = data.images.float() / 127.5 - 1.0  # uint8 → [-1, 1]
        micro = cfg.train.micro_batch_size or per_rank

        # Caption dropout: the empty caption's encoding teaches the unconditional model for CFG.
        # (Drawn for the whole global batch, then sliced: the same samples whatever the world size.)
        drop = (torch.rand(stage.batch_size, generator=gen) < cfg.data.caption_dropout)[rows]
        captions = ["" if d else c for c, d in zip(data.captions, drop.tolist())]
        if data.text is not None:  # precomputed embeddings: dropped rows take the empty caption's
            empty = self.data.empty_embedding
            data.text = data.text.with_rows_replaced(drop, TextBatch(torch.from_numpy(empty.copy())[None],
                                                                       torch.ones(1, empty.shape[0], dtype=torch.bool)))

        # Noise: x_t = (1 − t)·x0 + t·ε.
        t = sample_timesteps(stage.batch_size, cfg.objective, gen)[rows]
        noise = sample_noise(tuple(images.shape), cfg.train.seed, step, rank * per_rank, dev) * cfg.objective.noise_scale

        # TREAD: which image tokens skip the routed blocks in this step.
        grid = (stage.resolution // cfg.model.patch_size,) * 2
        route = None
        if stage.tread and self.router is not None:
            route = self.router.route(stage.batch_size, grid[0] * grid[1], cfg.model.num_layers, step, device=dev)
            route = route.slice(rows) if route is not None else None
        use_repa = stage.repa and self.repa is not None
        use_perceptual = stage.perceptual and self.perceptual is not None

        totals: dict[str, float] = defaultdict(float)
        for start in range(0, per_rank, micro):
            part = slice(start, start + micro)
            last = start + micro >= per_rank
            x0, t_part = images[part].to(dev), t[part].to(dev)
            with self.timer("text encoder"):
                text = (data.text[part] if data.text is not None else self.text_encoder.encode(captions[part])).to(dev)
            x_t = add_noise(x0, noise[part], t_part)
            with self._gradient_sync(last), torch.autocast(dev.type, dtype=self.autocast or torch.float32,
                                                           enabled=self.autocast is not None):
                with self.timer("denoiser forward"):
                    out = self.forward_model(x_t, t_part, text.embeds, text.mask,
                                             route=route.slice(part) if route else None,
                                             capture_block=self.repa.block_index if use_repa else None)
                    losses = {"flow": flow_loss(out.x0, x0, x_t, t_part, cfg.objective.t_clamp)}
                if use_perceptual:
                    with self.timer("perceptual forward (LPIPS + DINO)"):
                        losses.update(self.perceptual(out.x0, x0, t_part))
                if use_repa:
                    with self.timer("REPA forward (teacher + projector)"):
                        losses["repa"] = self.repa(out.hidden, x0, grid, out.hidden_index)
                loss = sum(losses.values())
                if not all_agree(bool(torch.isfinite(loss)), self.dist):  # every rank skips together
                    return self._skip(loss, losses)
                with self.timer("backward"):
                    (loss * (x0.shape[0] / per_rank)).backward()  # mean over this rank; DDP/FSDP average ranks
            for name, value in losses.items():
                totals[name] += value.item() * x0.shape[0] / per_rank

        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), clip))
        if not torch.isfinite(grad_norm):  # the norm is global: every rank sees the same value
            return self._skip(grad_norm, {})

        scale = lr_scale(step, cfg.total_steps, cfg.optimizer)
        self.optimizer.set_lr_scale(scale)
        with self.timer("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("EMA"):
            self.ema.update(self.model, step + 1)
        return StepResult(sum(totals.values()), dict(totals), grad_norm.item(), scale * cfg.optimizer.lr)

    def _gradient_sync(self, last_micro_batch: bool):
        """Accumulate without communicating until the last micro-batch of the step."""
        wrapped = [self.forward_model] + ([self.repa.projector] if self.repa is not None else [])
        if self.parallel == "fsdp":
            for module in wrapped:
                module.set_requires_gradient_sync(last_micro_batch)
        stack = contextlib.ExitStack()
        if self.parallel == "ddp" and not last_micro_batch:
            for module in wrapped:
                stack.enter_context(module.no_sync())
        return stack

    def _skip(self, value: torch.Tensor, losses: dict) -> StepResult:
        """A non-finite loss or gradient: drop the update, count it, stop if it keeps happening."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        which = ", ".join(f"{k}={float(v.detach()):.3g}" for k, v in losses.items()) or f"grad norm {float(value):.3g}"
        if self.bad_steps > self.config.train.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} steps had a non-finite loss or gradient (last: {which}; limit train.max_bad_steps="
                f"{self.config.train.max_bad_steps}): lower optimizer.lr or raise optimizer.warmup_steps, "
                f"then resume from {self.run_dir / 'checkpoints' / 'latest'}"
            )
        return StepResult(float(value.detach()), {}, skipped=True)

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.trainable, self.optimizer.optimizers)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "ema": self.ema.state_dict(),
            "trainer": {"step": self.step, "bad_steps": self.bad_steps},
            "data": self.data.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }

    def load(self, path: Path) -> None:
        state = self.state_dict()
        load_checkpoint(path, state)
        set_state_dict(self.trainable, self.optimizer.optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["trainer"]["step"])
        self.bad_steps = int(state["trainer"]["bad_steps"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])

    def save(self, wait: bool = False) -> Path | None:
        path = self.checkpoints.save(self.step, self.state_dict(), self.config)
        return self.checkpoints.wait() if wait and path is None else path

    # ----------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------

    def sample_grid(self) -> Path | None:
        prompts = self.config.logging.sample_prompts
        if not prompts:
            return None
        _, stage = self.config.stage_at(max(self.step - 1, 0))
        pipe = Pipeline(self.ema.model, self.text_encoder, self.config, self.device)
        images = pipe.generate(prompts, steps=self.config.logging.sample_steps, resolution=stage.resolution).numpy()
        if not self.dist.is_main:  # every rank samples (FSDP gathers the weights), rank 0 writes
            return None
        out = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, prompts, ncol=min(8, len(prompts)))
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(out)), self.step, dataformats="HWC")
        return out

    def _open_writer(self):
        if not self.config.logging.tensorboard or not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step)

    def _describe_stage(self, index: int, stage: StageConfig) -> str:
        on = ["flow"]
        if stage.tread and self.router is not None:
            on.append(f"TREAD {self.router.route_ratio:g}")
        if stage.repa and self.repa is not None:
            on.append(f"REPA {self.repa.loss_weight:g}")
        if stage.perceptual and self.perceptual is not None:
            on.append(f"LPIPS {self.perceptual.lpips_weight:g} + DINO {self.perceptual.dino_weight:g}")
        return (f"stage {index + 1}/{len(self.config.stages)}: {stage.resolution}px, batch {stage.batch_size}, "
                f"{stage.steps} steps, {', '.join(on)}")

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to the end of the last stage; returns the newest checkpoint (also ``RUN/checkpoints/latest``)."""
        self.setup()
        cfg = self.config
        total = cfg.total_steps
        if not self.dist.is_main:  # one voice: rank 0 prints, logs and writes files
            self.log = lambda *args, **kwargs: None
        n_params = sum(p.numel() for p in self.ema.model.parameters()) if self.parallel == "fsdp" else count_parameters(self.model)
        where = f"resuming {self.resume_from} at step {self.step}" if self.resume_from else "new run"
        ranks = f" × {self.dist.world} ranks ({self.parallel})" if self.dist.enabled else ""
        self.log(
            f"prx: {cfg.name} | {where} | {n_params / 1e6:.2f}M params | {total} steps | {self.device}{ranks}"
            f"{', bf16 autocast' if self.autocast else ', fp32'} | run dir {self.run_dir}"
        )
        self.writer = self._open_writer()
        if self.step >= total:
            return self._finish("already complete")

        self._install_interrupt_handler()
        start_time = time.monotonic()
        limit = cfg.train.time_limit_minutes * 60
        stage_index = None
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.logging.progress_bar and self.dist.is_main),
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.dist.is_main else None
        window, window_start, window_steps = defaultdict(list), time.monotonic(), 0
        try:
            while self.step < total:
                index, stage = cfg.stage_at(self.step)
                if index != stage_index:
                    stage_index = index
                    if cfg.logging.progress_bar and self.dist.is_main:
                        bar.write(self._describe_stage(index, stage))
                    else:
                        self.log(self._describe_stage(index, stage))
                result = self.train_step(self.step)
                self.step += 1
                bar.update(1)
                window_steps += 1
                if not result.skipped:
                    window["total"].append(result.loss)
                    for name, value in result.losses.items():
                        window[name].append(value)
                if self.step % cfg.logging.log_every == 0 or self.step == total:
                    elapsed = time.monotonic() - window_start
                    means = mean_across_ranks({k: sum(v) / len(v) for k, v in window.items() if v}, self.dist)
                    if metrics is not None:
                        metrics.write(json.dumps({"step": self.step, **{f"loss/{k}": v for k, v in means.items()},
                                                  "lr": result.lr, "grad_norm": result.grad_norm}) + "\n")
                        metrics.flush()
                    bar.set_postfix(loss=f"{means.get('total', float('nan')):.4f}", lr=f"{result.lr:.1e}", refresh=False)
                    if self.writer is not None:
                        for name, value in means.items():
                            self.writer.add_scalar(f"loss/{name}", value, self.step)
                        self.writer.add_scalar("train/grad_norm", result.grad_norm, self.step)
                        self.writer.add_scalar("train/lr", result.lr, self.step)
                        self.writer.add_scalar("train/steps_per_s", window_steps / elapsed, self.step)
                        self.writer.add_scalar("train/images_per_s", window_steps * stage.batch_size / elapsed, self.step)
                        self.writer.add_scalar("train/bad_steps", self.bad_steps, self.step)
                        self.writer.add_scalar("train/ema_decay", self.ema.current_decay(), self.step)
                        self.writer.add_scalar("train/stage", index + 1, self.step)
                        self.writer.add_scalar("data/skipped_samples", sum(self.data.skipped.values()), self.step)
                    window, window_start, window_steps = defaultdict(list), time.monotonic(), 0
                self.checkpoints.poll()  # a background save that every rank has finished becomes visible
                if self.step % cfg.train.checkpoint_every == 0 and self.step < total:
                    self.save()
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.step < total:
                    self.sample_grid()
                if limit and time.monotonic() - start_time > limit:
                    self.stop_reason = f"time limit of {cfg.train.time_limit_minutes:g} min reached"
                if not all_agree(self.stop_reason is None, self.dist):  # ranks stop at the same step
                    self.stop_reason = self.stop_reason or "stopped with the other ranks"
                    break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            self._restore_interrupt_handler()
        if self.stop_reason is None:
            grid = self.sample_grid() if cfg.logging.sample_every else None
            if grid is not None:
                self.log(f"samples: {grid}")
        return self._finish(self.stop_reason or "done")

    def _finish(self, reason: str) -> Path:
        unchanged = self.resume_from is not None and self.step == _checkpoint_step(self.resume_from)
        self.checkpoints.wait()
        path = self.resume_from if unchanged else self.save(wait=True)
        if self.writer is not None:
            self.writer.close()
        if self.bad_steps:
            self.log(f"warning: {self.bad_steps} steps were skipped for non-finite loss or gradients")
        if self.data.skipped:
            self.log(f"warning: {sum(self.data.skipped.values())} samples could not be loaded and were replaced "
                     f"({', '.join(f'{k}: {v}' for k, v in self.data.skipped.items())})")
        self.log(f"{reason} at step {self.step}/{self.config.total_steps}")
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
