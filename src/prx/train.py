"""The trainer. One training step is :meth:`Trainer.train_step`, readable top to bottom:

    data → caption dropout → t, noise → TREAD route → for each micro-batch:
        text encoding → x_t → model predicts x0 (and the REPA block's hidden state)
        → flow loss + perceptual losses + REPA → backward
    → clip → LR schedule → Muon/Adam step → EMA

Each trick is a small module the step calls explicitly, built from its own config section; resolution stages
switch them on and off (``Config.tricks``). How it executes is decided once (:mod:`prx.execution`). The rest is
set-up (:meth:`Trainer.setup`) and the loop (:meth:`Trainer.run`): logs, sample grids, checkpoints, time limits
and clean stops (Ctrl-C, SIGTERM: finish the step, save, exit).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prx.checkpoint import CheckpointWriter, training_state
from prx.config import Config, StageConfig
from prx.data.sources import build_source, sample_prompts
from prx.device import keep_freed_memory, set_threads, to_device
from prx.diffusers_io import load_init_weights
from prx.distributed import all_agree, full_value, gradient_sync, init_distributed, parallelize, reshard
from prx.divergence import Health, count_bad_step, ended_diverging
from prx.ema import EMA
from prx.execution import ExecutionPlan, block_shapes, plan_training
from prx.flow import add_noise, flow_loss, sample_noise, sample_timesteps, step_seed
from prx.lifecycle import RunClock, RunLock, StopSignals, out_of_memory_error, preflight
from prx.logger import RunLogger
from prx.lora import adapt, describe_lora, freeze_base_dtype
from prx.memory_plan import gpu_memory_of, train_start_lines
from prx.metrics.during_training import TrainingEval
from prx.model import PRX, projected_text_rows, token_grid
from prx.optim import MultiOptimizer, build_optimizer, lr_scale, param_groups_from_config
from prx.pipeline import Pipeline
from prx.resume import ResumePoint, checkpoint_to_resume, restore_intact
from prx.rundir import RunDir
from prx.seed_api import groups_after_sharding, recipe_tricks, resolve_components
from prx.text import TextEncoder, text_model_config
from prx.tread import TREADRouter


@dataclass
class StepResult:
    loss: float
    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")
    lr: float = 0.0
    skipped: bool = False
    image_size: tuple[int, int] = (0, 0)  # (height, width) of this step's images: its bucket
    text_length: int = 0  # the captions' padded length this step
    text_tokens: float = 0.0  # text tokens per sample the denoiser projected: the real ones where packs_text


class Trainer:
    """Trains a run into ``run_dir``, from a :class:`Config` or from the seed API's components
    (``Trainer(model=PRX(...), router=TREADRouter(...), ..., steps_512=...)``, :mod:`prx.seed_api`). ``resume``: None
    resumes when the run directory has a checkpoint; True requires one; False refuses a directory that has one.

    The config is never changed: what the run learns is trainer state, kept in its checkpoints (the step, the skipped
    steps, ``planned_steps`` of a time budget, ``model_config``: the text encoder's width, the weights' LayerNorm eps).
    """

    def __init__(self, config: Config | None = None, run_dir: str | Path | None = None, resume: bool | None = None, *,
                 log=print, **components):
        self.config, self._given = resolve_components(config, components)
        self.rundir = RunDir(run_dir if run_dir is not None else Path("runs") / self.config.name)
        self.run_dir = self.rundir.root
        self.resume, self.log, self.stop_reason, self.signals = resume, log, None, StopSignals()
        self.timer = lambda phase: contextlib.nullcontext()  # `prx bench` swaps in one that times each phase
        self.lock: RunLock | None = None
        self.micro_batch_size = self.config.train.micro_batch_size  # `prx bench --largest-micro-batch` tries others
        self.step = self.bad_steps = 0
        self.health = Health(self.config.train.divergence_factor)  # bad steps, confirmed checkpoints
        self.planned_steps: int | None = None  # the step count a time budget chose

    @property
    def total_steps(self) -> int:
        return self.planned_steps or self.config.total_steps

    @property
    def run_config(self) -> Config:  # the config with the model as built and the grid prompts: what checkpoints record
        return replace(self.config, model=self.model_config, logging=self.logging)

    # -- Set-up --------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 0. Fails before any work (one line) on a batch that does not split over the ranks,
        a model too big for memory, a run directory in use, another model's checkpoint or a change it cannot take."""
        try:
            self._start()
            self._build()
            self._parallelize()
            if self.resume_from is not None:
                restore_intact(self)  # (a checkpoint found damaged only now gives way to the one before it)
                self.planned_steps = self.resume_from.planned_steps(self.config)
            if self.dist.is_main:
                self.run_config.save(self.rundir.config)  # with the changes a resume took (they take effect now)
                self.rundir.execution.write_text(json.dumps(self.plan.to_dict(), indent=1) + "\n")
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        """The checks before any work, the process group, the run directory's lock and the checkpoint to resume."""
        cfg = self.config
        device = preflight(cfg, model_given=self._given["model"] is not None)  # batch split, memory, wandb
        set_threads(cfg.train.num_threads)
        if device.type == "cpu":  # a step's activations reuse the last step's memory instead of faulting in new pages
            keep_freed_memory()
        self.dist = init_distributed(device, cfg.train.timeout_minutes)
        self.device = self.dist.device
        self.lock = RunLock.for_run(self.rundir, self.dist)  # this training's until it ends; rank 0 holds it
        self.resume_from: ResumePoint | None = checkpoint_to_resume(self.rundir, self.resume, cfg, self.log,
                                                                    self.dist.is_main)
        torch.manual_seed(cfg.train.seed)

    def _build(self) -> None:
        """The text encoder, the model, the tricks (teachers load now: a missing one fails before step 0), the data."""
        cfg, given = self.config, self._given
        # held-out evaluation (eval:): its data and extractors open now, so a missing one fails before step 0
        self.evaluator = TrainingEval.build(cfg)
        self.text_encoder = given["text_encoder"] or TextEncoder.from_config(cfg.text, self.device)
        self.model_config = text_model_config(cfg.model, self.text_encoder, cfg.text.encoder)
        if self.resume_from is not None:  # the saved weights' own LayerNorm eps (1e-5 before the option)
            self.model_config = replace(self.model_config, norm_eps=self.resume_from.norm_eps)
        self.model = (given["model"] or PRX(self.model_config)).to(self.device)
        self.lora_base: dict | None = None  # a LoRA run's frozen base: model.init_from and its fingerprint
        if cfg.lora.enabled:  # the base is read on resume too: a LoRA checkpoint holds the adapters only
            resume = self.resume_from
            self.lora_base = adapt(self.model, cfg.lora, cfg.model.init_from, resume and resume.meta.get("lora_base"),
                                   resume and resume.path)
        elif cfg.model.init_from and self.resume_from is None:  # fine-tuning: a new run starts from diffusers weights
            message = load_init_weights(self.model, cfg.model.init_from)
            if self.dist.is_main:
                self.log(message)
        self.data = build_source(cfg, self.dist.rank, self.dist.world, pin_memory=self.device.type == "cuda")
        self.logging = replace(cfg.logging, sample_prompts=sample_prompts(cfg, self.data))  # the data's, unless given
        self.router = given["router"] or TREADRouter.from_config(cfg.tread, cfg.train.seed)
        shapes = block_shapes(cfg, self.data.sizes, self.dist.world, self.router.num_kept if self.router else None)
        muon_kinds = len({(tuple(p.shape), p.dtype) for p in self.model.muon_params})
        self.plan: ExecutionPlan = plan_training(cfg, self.device, self.dist.world, shapes, muon_kinds)
        if self.plan.frozen_base == "bf16":
            freeze_base_dtype(self.model, torch.bfloat16)
        self.repa, self.perceptual = recipe_tricks(cfg, given, self.model_config, self.plan.autocast or torch.float32,
                                                   self.device)
        self.ema = EMA.from_config(self.model, cfg.ema)  # a copy, before sharding (a LoRA run's: of the adapters)

    def _parallelize(self) -> None:
        """The execution plan applied (compile, CUDA graphs, FSDP2/DDP), then the optimizer over what it updates."""
        cfg = self.config
        # Everything the optimizer updates (and checkpoints hold): the denoiser and the REPA projector.
        self.trainable = nn.ModuleDict({"denoiser": self.model})
        if self.repa is not None:
            self.trainable["repa_projector"] = self.repa.projector
        names = {id(p): name for name, p in self.model.named_parameters()}  # the seed's groups hold these
        teachers = [net for net in (getattr(self.perceptual, "lpips", None), getattr(self.perceptual, "dino", None),
                                    getattr(self.repa, "teacher", None)) if net is not None]
        projector = self.repa.projector if self.repa else None
        self.forward_model, projector = parallelize(self.model, self.ema.model, projector, teachers, self.plan,
                                                    self.dist)
        if self.repa is not None:
            self.repa.projector = projector
        self.wrapped = [self.forward_model] + ([projector] if projector is not None else [])  # what syncs gradients
        self.optimizer: MultiOptimizer = build_optimizer(
            groups_after_sharding(self._given["param_groups"], self.model, names) or param_groups_from_config(
                self.model, cfg.optimizer, adamw_only=cfg.lora.enabled and cfg.lora.optimizer == "adamw"),
            list(self.trainable["repa_projector"].parameters()) if self.repa is not None else [],
            compile_muon=self.plan.compile_optimizer, ns_dtype=self.plan.newton_schulz_dtype)
        self.checkpoints = CheckpointWriter(self.rundir, self.dist, cfg.train.keep_checkpoints,
                                            cfg.train.async_checkpoint)

    def close(self) -> None:
        """Stop the data workers and release the run directory (the lock), however :meth:`run` ends."""
        if hasattr(getattr(self, "data", None), "close"):
            self.data.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    # -- The training step ---------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg, dev, rank, world = self.config, self.device, self.dist.rank, self.dist.world
        stage_index, stage = cfg.stage_at(step)
        on = cfg.tricks(stage)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
        per_rank = stage.batch_size // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's share of the global batch
        if self.plan.any_graphs:  # CUDA graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()

        with self.timer("data"):
            data = self.data.batch(step, stage_index, stage)  # this rank's samples of the step
        images = to_device(data.images, dev)  # uint8: a quarter of float32's bytes to copy
        micro = self.micro_batch_size or per_rank

        # Caption dropout: the empty caption's encoding teaches the unconditional model for CFG.
        # (Drawn for the whole global batch, then sliced: the same samples whatever the world size.)
        drop = (torch.rand(stage.batch_size, generator=gen) < cfg.data.caption_dropout)[rows]
        captions = data.drop_captions(drop, self.data.empty_embedding)

        # Noise: x_t = (1 − t)·x0 + t·ε.
        t = to_device(sample_timesteps(stage.batch_size, cfg.objective, gen)[rows], dev)
        noise = sample_noise(tuple(images.shape), cfg.train.seed, step, rows.start, dev,
                             cfg.objective.noise_offset) * cfg.objective.noise_scale

        # The token grid is the batch's own: aspect-ratio buckets are not square (12×21 at 512 px, ...).
        grid = token_grid(*images.shape[-2:], cfg.model.patch_size)
        # TREAD: which image tokens of each of this rank's samples skip the routed blocks in this step.
        route = None
        if on.tread and self.router is not None:
            route = self.router.route(step, rows.start, per_rank, grid[0] * grid[1], cfg.model.num_layers, device=dev)
        use_repa, use_perceptual = on.repa and self.repa is not None, on.perceptual and self.perceptual is not None

        # The losses stay on the device until the step's one sync, below: a GPU must never wait for the host.
        totals: dict[str, torch.Tensor] = {}
        text_tokens = 0  # FLOP accounting (prx bench): the text rows the denoiser projects
        for start in range(0, per_rank, micro):
            part, share = slice(start, start + micro), min(micro, per_rank - start) / per_rank
            x0, t_part = images[part].float() / 127.5 - 1.0, t[part]  # uint8 → [-1, 1]
            with self.timer("text encoder"):
                text = (data.text[part] if data.text is not None else self.text_encoder.encode(captions[part])).to(dev)
            text_tokens += projected_text_rows(text.mask)
            x_t = add_noise(x0, noise[part], t_part)
            with gradient_sync(self.wrapped, self.plan.parallel, start + micro >= per_rank), torch.autocast(
                    dev.type, dtype=self.plan.autocast or torch.float32, enabled=self.plan.autocast is not None):
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
                with self.timer("backward"):  # a non-finite loss makes non-finite gradients: the step is dropped below
                    (sum(losses.values()) * share).backward()  # mean over this rank; DDP/FSDP average ranks
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() * share

        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), clip))
        # The step's one sync: the losses and the (global) gradient norm. Every rank drops a step any rank found
        # non-finite, or whose loss or gradient norm blew up (prx.divergence), before the optimizer sees its gradients.
        with self.timer("device read"):  # (prx bench times the host's wait here)
            grad_norm, *values = torch.stack([grad_norm.float(), *totals.values()]).tolist()
        losses = dict(zip(totals, values))
        if (reason := self.health.judge_step(step, stage_index, losses, grad_norm, self.dist)) is not None:
            return self._skip(losses, grad_norm, reason)

        scale = lr_scale(step, self.total_steps, cfg.optimizer)
        self.optimizer.set_lr_scale(scale)
        with self.timer("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("EMA"):
            self.ema.update(self.model, step + 1)
        return StepResult(sum(values), losses, grad_norm, scale * cfg.optimizer.lr, image_size=tuple(images.shape[-2:]),
                          text_length=text.mask.shape[1], text_tokens=text_tokens / per_rank)

    def _skip(self, losses: dict[str, float], grad_norm: float, reason: str) -> StepResult:
        """A bad step: drop the update, count it, stop if it keeps happening (prx.divergence.count_bad_step)."""
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(count_bad_step(self, losses, grad_norm, reason), {}, skipped=True)

    # -- The loop ------------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to the end of the last stage; returns the newest checkpoint (also ``RUN/checkpoints/latest``)."""
        self.setup()
        try:
            return self._loop()
        finally:
            self.close()

    def _loop(self) -> Path:
        cfg = self.config
        if not self.dist.is_main:  # one voice: rank 0 prints, logs and writes files
            self.log = lambda *args, **kwargs: None
        self._announce()
        if self.step >= self.total_steps:
            return self._finish("already complete")
        clock, stage_index = RunClock(cfg.train, self.step, steps_planned=bool(self.planned_steps)), None
        try:
            with self.signals:
                while self.step < self.total_steps:
                    index, stage = cfg.stage_at(self.step)
                    if index != stage_index:
                        stage_index = index
                        self.logger.line(cfg.describe_stage(index))
                    try:
                        result = self.train_step(self.step)
                    except torch.OutOfMemoryError as error:
                        if not self.dist.enabled:  # the other ranks are inside the step: no collective to finish
                            self.checkpoints.wait()  # a checkpoint still being written becomes visible first
                        raise out_of_memory_error(self, stage, error) from error
                    self.step += 1
                    self.logger.bar.update(1)
                    if (steps := clock.plan(self.step)) is not None:  # train.time_budget_minutes
                        self.planned_steps, line = clock.fix_steps(cfg, steps, self.step, self.dist)
                        self.logger.line(line)
                        self.logger.bar.total = self.total_steps
                    self._after_step(result, stage, index)
                    self.stop_reason = f"stopped by {self.signals.received}" if self.signals.received else (
                        clock.limit_reached())
                    if not all_agree(self.stop_reason is None, self.dist):  # ranks stop at the same step
                        self.stop_reason = self.stop_reason or "stopped with the other ranks"
                        break
                if self.stop_reason is None:  # a last grid (if the run is long enough to have a schedule), eval
                    if 0 < cfg.logging.sample_every <= self.total_steps and (grid := self.sample_grid()) is not None:
                        self.log(f"samples: {grid}")
                    if self.evaluator is not None:
                        self.evaluate()
                return self._finish(self.stop_reason or "done")
        finally:
            self.logger.close()

    def _announce(self) -> None:
        """The run's first lines: what, where, how (the execution plan), and the logger that reports the rest."""
        cfg = self.config
        n_params = sum(p.numel() for p in self.ema.model.parameters())
        where = f"resuming {self.resume_from.path} at step {self.step}" if self.resume_from else "new run"
        self.log(f"prx: {cfg.name} | {where} | {n_params / 1e6:.2f}M params | {self.total_steps} steps | "
                 f"run dir {self.run_dir} | PID {os.getpid()}")
        if self.lora_base is not None:
            self.log(describe_lora(self.model, cfg.lora, self.lora_base["init_from"]))
        self.log(self.plan.describe())
        if self.device.type == "cuda" and self.dist.is_main and self._given["model"] is None:  # the plan, this GPU
            for line in train_start_lines(cfg, gpu_memory_of(self.device), self.dist.world, self.plan.parallel):
                self.log(line)
        self.logger = RunLogger(self.logging, self.rundir, self.step, self.total_steps, self.dist.is_main, self.log,
                                run_config=cfg.to_dict())
        if self.evaluator is not None:
            self.log(self.evaluator.describe())

    def _after_step(self, result: StepResult, stage: StageConfig, index: int) -> None:
        """A finished step's bookkeeping: its losses, the log line, a checkpoint, a sample grid, an evaluation."""
        cfg = self.config
        self.logger.step_done(None if result.skipped else {"total": result.loss, **result.losses})
        if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
            self.logger.log_step(self.step, stage.batch_size, self.dist, {
                "lr": result.lr, "grad_norm": result.grad_norm, "train/stage": index + 1,
                "train/bad_steps": self.bad_steps, "train/ema_decay": self.ema.current_decay(),
                "data/skipped_samples": sum(self.data.skipped.values())})
        self.checkpoints.poll()  # a background save that every rank has finished becomes visible
        if self.step % cfg.train.checkpoint_every == 0 and self.step < self.total_steps:
            self.save()
        if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.step < self.total_steps:
            self.sample_grid()
        if self.evaluator is not None and self.evaluator.due(self.step) and self.step < self.total_steps:
            with self.logger.paused():  # steps/s counts training only
                self.evaluate()

    @property
    def exit_code(self) -> int:
        """0 when the run ended normally; 128 + the signal number when a signal stopped it (130 Ctrl-C)."""
        return self.signals.exit_code if self.stop_reason and self.stop_reason.startswith("stopped by") else 0

    def save(self, wait: bool = False) -> Path | None:
        """Write a checkpoint of this step, unless the last step was bad (its weights just gave a bad loss)."""
        if self.health.last_bad:
            return None
        meta = {"planned_steps": self.planned_steps} if self.planned_steps else {}  # a time budget's count, kept
        if self.lora_base is not None:
            meta["lora_base"] = self.lora_base  # what the adapters go on
        self.checkpoints.protect = self.health.confirmed  # pruning keeps it
        path = self.checkpoints.save(self.step, training_state(self), self.run_config, meta, log=self.log)
        self.health.saved(self.step)
        return self.checkpoints.wait() if wait and path is None else path

    def sample_grid(self) -> Path | None:
        """A grid of ``logging.sample_prompts`` with the EMA weights (:meth:`RunLogger.sample_grid`)."""
        _, stage = self.config.stage_at(max(self.step - 1, 0))
        pipe = Pipeline(self.ema.model, self.text_encoder, self.run_config, self.device)
        path = self.logger.sample_grid(pipe, self.data.sizes(stage), self.step, self.config.sampling.seed)
        if self.plan.parallel == "fsdp":
            reshard(self.ema.model)  # the EMA update works on shards
        return path

    def evaluate(self) -> dict:
        """The ``eval:`` metrics of the EMA weights, with ``prx eval --data``'s code, on every rank (each
        its share of the held-out samples); rank 0 logs them and writes ``RUN/eval/step_N/real/results.json``."""
        self.checkpoints.wait()  # a checkpoint still being written becomes visible first: eval cannot lose it
        _, stage = self.config.stage_at(max(self.step - 1, 0))
        results = self.evaluator.run(self.ema.model, self.text_encoder, self.run_config, self.device, stage.resolution,
                                     sharded=self.plan.parallel == "fsdp")
        if self.dist.is_main:
            saved = self.step % self.config.train.checkpoint_every == 0 or self.step == self.total_steps
            self.evaluator.report(self.logger, self.rundir, self.step, results,
                                  self.rundir.checkpoint(self.step) if saved else None)
        return results

    def _finish(self, reason: str) -> Path:
        self.checkpoints.wait()
        unchanged = self.resume_from is not None and self.step == self.resume_from.step
        path = ended_diverging(self) if self.health.last_bad else (
            self.resume_from.path if unchanged else self.save(wait=True))
        if self.bad_steps:
            self.log(f"warning: {self.bad_steps} steps were skipped for non-finite loss or gradients")
        if self.data.skipped:
            self.log(f"warning: {sum(self.data.skipped.values())} samples could not be loaded and were replaced "
                     f"({', '.join(f'{k}: {v}' for k, v in self.data.skipped.items())})")
        self.log(f"{reason} at step {self.step}/{self.total_steps}")
        self.log(f"checkpoint: {self.rundir.latest} -> {path.name}" if path else "checkpoint: none")
        return path
