"""The trainer. One training step is :meth:`Trainer.train_step`, readable top to bottom:

    data → caption dropout → t, noise → TREAD route → for each micro-batch:
        text encoding → x_t → model predicts x0 (and the REPA block's hidden state)
        → flow loss + perceptual losses + REPA → backward
    → clip → LR schedule → Muon/Adam step → EMA

Each trick of the recipe is a small module the step calls explicitly (``TREADRouter``,
``REPAAlignment``, ``PerceptualLoss``), built from its own config section; a run is a list of
resolution stages that switch them on and off (``Config.tricks``). Everything else is set-up
(:meth:`Trainer.setup`) and the loop (:meth:`Trainer.run`): logging, sample grids, checkpoints,
the time limit and clean stops (Ctrl-C, SIGTERM: finish the step, save, exit).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prx.checkpoint import (CheckpointWriter, checkpoint_to_resume, restore_training_state, step_dir_name, step_of,
                            training_state)
from prx.config import Config, StageConfig
from prx.data.sources import build_source
from prx.diffusers_io import load_init_weights
from prx.distributed import (all_agree, compiles_also, compiles_on, full_value, gradient_sync, init_distributed,
                             mean_across_ranks, parallelize, recompile_limit, reshard, teacher_graphs)
from prx.ema import EMA
from prx.errors import TrainingError
from prx.flow import add_noise, flow_loss, sample_noise, sample_timesteps, step_seed
from prx.logger import RunLogger
from prx.metrics.during_training import TrainingEval
from prx.model import PRX, packed_text_rows, packs_text
from prx.optim import MultiOptimizer, build_optimizer, lr_scale, param_groups_from_config
from prx.perceptual import PerceptualLoss
from prx.pipeline import Pipeline
from prx.repa import REPAAlignment
from prx.runtime import (RunClock, RunLock, StopSignals, autocast_dtype, keep_freed_memory, preflight, set_threads,
                         to_device)
from prx.seed_api import groups_after_sharding, resolve_components
from prx.text import TextEncoder, fit_text_dim
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


def block_shapes(cfg: Config, data, router: TREADRouter | None, world: int) -> set[tuple[int, int, bool]]:
    """(micro-batch, image tokens, routed) of each kind of block call the run makes: every stage's image shapes
    (its aspect-ratio buckets), with TREAD the routed blocks' shorter rows too. Compiled for static shapes, the
    blocks build a graph for each (``train.compile_shapes``)."""
    shapes = set()
    for stage in cfg.stages:
        per_rank = stage.batch_size // world
        micro = cfg.train.micro_batch_size or per_rank
        routed = cfg.tricks(stage).tread and router is not None
        for start in range(0, per_rank, micro):
            for width, height in data.sizes(stage):
                tokens = (width // cfg.model.patch_size) * (height // cfg.model.patch_size)
                shapes.add((min(micro, per_rank - start), tokens, False))
                if routed:
                    shapes.add((min(micro, per_rank - start), router.num_kept(tokens), True))
    return shapes


def steady_shapes(cfg: Config, world: int) -> bool:
    """Whether each step calls the blocks with one set of shapes per image shape: one micro-batch per rank in every
    stage and captions padded to one length (``text.min_length`` ≥ ``text.max_length``), as where CUDA graphs were
    measured (``train.cuda_graphs: auto``)."""
    micro = cfg.train.micro_batch_size
    one_micro_batch = not micro or all(micro >= stage.batch_size // world for stage in cfg.stages)
    return one_micro_batch and cfg.text.min_length >= cfg.text.max_length


class Trainer:
    """Trains a run into ``run_dir``, from a :class:`Config` or from components, the seed's API
    (``Trainer(model=PRX(...), router=TREADRouter(...), ..., steps_512=...)``, see :mod:`prx.seed_api`).

    ``resume``: None resumes when the run directory has a checkpoint (the same command continues
    a run); True requires one; False refuses to touch a run directory that has one.
    """

    def __init__(self, config: Config | None = None, run_dir: str | Path | None = None, resume: bool | None = None, *,
                 log=print, **components):
        self.config, self._given = resolve_components(config, components)
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.config.name
        self.resume = resume
        self.log = log
        self.stop_reason: str | None = None
        self.signals = StopSignals()
        self.timer = lambda phase: contextlib.nullcontext()  # `prx bench` swaps in one that times each phase
        self.lock: RunLock | None = None

    # ----------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before step 0. Fails before any work (one line) on a batch that does not split over the ranks,
        a model too big for memory, a run directory in use, another model's checkpoint or a change it cannot take."""
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, given = self.config, self._given
        device = preflight(cfg, model_given=given["model"] is not None)  # batch split, memory, wandb: before any work
        set_threads(cfg.train.num_threads)
        if device.type == "cpu":  # a step's activations reuse the last step's memory instead of faulting in new pages
            keep_freed_memory()
        self.dist = init_distributed(device, cfg.train.timeout_minutes)
        self.device = self.dist.device
        self.lock = RunLock.for_run(self.run_dir, self.dist)  # this training's until it ends; rank 0 holds it
        self.resume_from = checkpoint_to_resume(self.run_dir, self.resume, cfg, self.log, self.dist.is_main)
        self.autocast = autocast_dtype(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        # Held-out evaluation (eval:): data opened and extractors loaded once, now, so a missing one fails before step 0.
        self.evaluator = TrainingEval.build(cfg)

        self.text_encoder = given["text_encoder"] or TextEncoder.from_config(cfg.text, self.device)
        fit_text_dim(cfg.model, self.text_encoder, cfg.text.encoder)
        self.model = (given["model"] or PRX(cfg.model)).to(self.device)
        if cfg.model.init_from and self.resume_from is None:  # fine-tuning: a new run starts from diffusers weights
            message = load_init_weights(self.model, cfg.model.init_from)
            if self.dist.is_main:
                self.log(message)

        # The recipe's tricks, each built from its own section; teachers load now, so a missing one fails before step 0.
        teacher_dtype = self.autocast or torch.float32
        self.router = given["router"] or TREADRouter.from_config(cfg.tread, cfg.train.seed)
        self.repa = given["repa"] or REPAAlignment.from_config(cfg.repa)
        if self.repa is not None:
            self.repa.setup(cfg.model.hidden_dim, cfg.model.num_layers, dtype=teacher_dtype).to(self.device)
        self.perceptual = given["perceptual_loss"] or PerceptualLoss.from_config(cfg.perceptual)
        if self.perceptual is not None:
            self.perceptual.load(teacher_dtype).to(self.device)
        self.data = build_source(cfg, self.dist.rank, self.dist.world)
        shapes = block_shapes(cfg, self.data, self.router, self.dist.world)  # the calls' shapes: what compiles how
        # room for the graphs the compiled blocks and teachers make (past it they would run eagerly)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit(shapes))
        self.ema = EMA.from_config(self.model, cfg.ema)  # a copy, before sharding

        # Everything the optimizer updates (and checkpoints hold): the denoiser and the REPA projector.
        self.trainable = nn.ModuleDict({"denoiser": self.model})
        if self.repa is not None:
            self.trainable["repa_projector"] = self.repa.projector
        names = {id(p): name for name, p in self.model.named_parameters()}  # the seed's groups hold these
        self.parallel, self.forward_model, projector, self.cuda_graphs = parallelize(
            self.model, self.ema.model, self.repa.projector if self.repa else None, cfg.train, self.dist, self.autocast,
            shapes, steady_shapes(cfg, self.dist.world))
        if self.repa is not None:
            self.repa.projector = projector
        # The teachers compiled (train.compile_teachers), each called as before, and replayed as CUDA graphs
        # (train.cuda_graphs_teachers: auto = with the blocks' graphs)
        teachers_compiled = compiles_also(cfg.train.compile_teachers, cfg.train, self.device)
        self.teacher_graphs = teacher_graphs(cfg.train.cuda_graphs_teachers, teachers_compiled, self.device,
                                             self.cuda_graphs)
        if cfg.train.cuda_graphs_teachers == "on" and not self.teacher_graphs:
            warnings.warn("train.cuda_graphs_teachers=on needs compiled teachers on a GPU: training without their "
                          "CUDA graphs", RuntimeWarning, stacklevel=2)
        if teachers_compiled:
            for net in (getattr(self.perceptual, "lpips", None), getattr(self.perceptual, "dino", None),
                        getattr(self.repa, "teacher", None)):
                if net is not None:
                    net.compile(mode="reduce-overhead" if self.teacher_graphs else None)
        # Muon's memory-bound passes compiled: auto = with the blocks as CUDA graphs. On an H200 that made the seed
        # recipe's step 1.08× faster; without graphs, where the host launches more slowly than the GPU runs, 0.95×.
        compile_muon = (cfg.train.compile_optimizer == "on" and compiles_on(self.device, "train.compile_optimizer")) or (
            cfg.train.compile_optimizer == "auto" and self.cuda_graphs)
        self.wrapped = [self.forward_model] + ([projector] if projector is not None else [])  # what syncs gradients
        self.optimizer: MultiOptimizer = build_optimizer(
            groups_after_sharding(given["param_groups"], self.model, names) or param_groups_from_config(
                self.model, cfg.optimizer),
            list(self.trainable["repa_projector"].parameters()) if self.repa is not None else [],
            compile_muon=compile_muon)

        self.checkpoints = CheckpointWriter(self.run_dir, self.dist, cfg.train.keep_checkpoints,
                                            cfg.train.async_checkpoint)
        self.step = self.bad_steps = 0
        self.planned_steps = None  # the step count a time budget chose (kept in checkpoints' meta.json)
        if self.resume_from is not None:
            restore_training_state(self, self.resume_from)
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.yaml")  # with the config changes a resume made (they take effect now)

    def close(self) -> None:
        """Stop the data workers and release the run directory (the lock); called when :meth:`run`
        ends, however it ends."""
        if hasattr(getattr(self, "data", None), "close"):
            self.data.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    # ----------------------------------------------------------------------------------------
    # The training step
    # ----------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg, dev, rank, world = self.config, self.device, self.dist.rank, self.dist.world
        stage_index, stage = cfg.stage_at(step)
        on = cfg.tricks(stage)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
        if stage.batch_size % world:
            raise TrainingError(f"the batch size {stage.batch_size} does not split over {world} ranks: use a multiple")
        per_rank = stage.batch_size // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's share of the global batch
        if self.cuda_graphs or self.teacher_graphs:  # CUDA graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()

        with self.timer("data"):
            data = self.data.batch(step, stage_index, stage)  # this rank's samples of the step
        images = to_device(data.images, dev)  # uint8: a quarter of float32's bytes to copy
        micro = cfg.train.micro_batch_size or per_rank

        # Caption dropout: the empty caption's encoding teaches the unconditional model for CFG.
        # (Drawn for the whole global batch, then sliced: the same samples whatever the world size.)
        drop = (torch.rand(stage.batch_size, generator=gen) < cfg.data.caption_dropout)[rows]
        captions = data.drop_captions(drop, self.data.empty_embedding)

        # Noise: x_t = (1 − t)·x0 + t·ε.
        t = to_device(sample_timesteps(stage.batch_size, cfg.objective, gen)[rows], dev)
        noise = sample_noise(tuple(images.shape), cfg.train.seed, step, rows.start, dev,
                             cfg.objective.noise_offset) * cfg.objective.noise_scale

        # The token grid is the batch's own: aspect-ratio buckets are not square (12×21 at 512 px, ...).
        grid = (images.shape[-2] // cfg.model.patch_size, images.shape[-1] // cfg.model.patch_size)
        # TREAD: which image tokens of each of this rank's samples skip the routed blocks in this step.
        route = None
        if on.tread and self.router is not None:
            route = self.router.route(step, rows.start, per_rank, grid[0] * grid[1], cfg.model.num_layers, device=dev)
        use_repa, use_perceptual = on.repa and self.repa is not None, on.perceptual and self.perceptual is not None

        # The losses stay on the device until the step's one sync, below: a GPU whose host launches work no
        # faster than it runs it must never wait for the host (an `.item()` per loss per micro-batch drained its queue).
        totals: dict[str, torch.Tensor] = {}
        text_tokens = 0  # FLOP accounting (prx bench): the text rows the denoiser projects
        for start in range(0, per_rank, micro):
            part = slice(start, start + micro)
            last = start + micro >= per_rank
            x0, t_part = images[part].float() / 127.5 - 1.0, t[part]  # uint8 → [-1, 1]
            with self.timer("text encoder"):
                text = (data.text[part] if data.text is not None else self.text_encoder.encode(captions[part])).to(dev)
            # (packed on a CPU only, where reading the mask is no device read)
            text_tokens += packed_text_rows(int(text.mask.sum()), text.mask.numel()) if packs_text(dev) else text.mask.numel()
            x_t = add_noise(x0, noise[part], t_part)
            with gradient_sync(self.wrapped, self.parallel, last), torch.autocast(
                    dev.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
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
                    (sum(losses.values()) * (x0.shape[0] / per_rank)).backward()  # mean over this rank; DDP/FSDP average ranks
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() * (x0.shape[0] / per_rank)

        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), clip))
        # The step's one sync: the losses and the (global) gradient norm. Every rank drops a step any rank found
        # non-finite, before the optimizer sees its gradients.
        with self.timer("device read"):  # (prx bench times the host's wait here)
            grad_norm, *values = torch.stack([grad_norm.float(), *totals.values()]).tolist()
        losses = dict(zip(totals, values))
        if not all_agree(all(map(math.isfinite, [grad_norm, *values])), self.dist):
            return self._skip(losses, grad_norm)

        scale = lr_scale(step, cfg.total_steps, cfg.optimizer)
        self.optimizer.set_lr_scale(scale)
        with self.timer("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer("EMA"):
            self.ema.update(self.model, step + 1)
        return StepResult(sum(values), losses, grad_norm, scale * cfg.optimizer.lr, image_size=tuple(images.shape[-2:]),
                          text_length=text.mask.shape[1], text_tokens=text_tokens / per_rank)

    def _skip(self, losses: dict[str, float], grad_norm: float) -> StepResult:
        """A non-finite loss or gradient: drop the update, count it, stop if it keeps happening."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        which = ", ".join(f"{k}={v:.3g}" for k, v in bad.items()) or f"grad norm {grad_norm:.3g}"
        if self.bad_steps > self.config.train.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} steps had a non-finite loss or gradient (last: {which}; limit "
                                f"train.max_bad_steps={self.config.train.max_bad_steps}): lower optimizer.lr or raise "
                                f"optimizer.warmup_steps, then resume from {self.run_dir / 'checkpoints' / 'latest'}")
        return StepResult(sum(losses.values()) if bad else grad_norm, {}, skipped=True)

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to the end of the last stage; returns the newest checkpoint (also ``RUN/checkpoints/latest``)."""
        self.setup()
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> Path:
        cfg, total = self.config, self.config.total_steps
        if not self.dist.is_main:  # one voice: rank 0 prints, logs and writes files
            self.log = lambda *args, **kwargs: None
        n_params = sum(p.numel() for p in self.ema.model.parameters())
        where = f"resuming {self.resume_from} at step {self.step}" if self.resume_from else "new run"
        ranks = f" × {self.dist.world} ranks ({self.parallel})" if self.dist.enabled else ""
        self.log(f"prx: {cfg.name} | {where} | {n_params / 1e6:.2f}M params | {total} steps | {self.device}{ranks}"
                 f"{', bf16 autocast' if self.autocast else ', fp32'}"
                 f"{', math attention' if self.model.blocks[0].attention == 'math' else ''}"
                 f"{', blocks as CUDA graphs' if self.cuda_graphs else ''} | run dir {self.run_dir}")
        self.logger = RunLogger(cfg.logging, self.run_dir, self.step, total, self.dist.is_main, self.log,
                                run_config=cfg.to_dict())
        if self.evaluator is not None:
            self.log(self.evaluator.describe())
        if self.step >= total:
            return self._finish("already complete")
        clock, stage_index = RunClock(cfg.train, self.step, steps_planned=bool(self.planned_steps)), None
        window_start, window_steps = time.monotonic(), 0
        try:
            with self.signals:
                while self.step < total:
                    index, stage = cfg.stage_at(self.step)
                    if index != stage_index:
                        stage_index = index
                        self.logger.line(cfg.describe_stage(index))
                    try:
                        result = self.train_step(self.step)
                    except torch.OutOfMemoryError as error:
                        if not self.dist.enabled:  # the other ranks are inside the step: no collective to finish
                            self.checkpoints.wait()  # a checkpoint still being written becomes visible first
                        raise self._out_of_memory(stage, error) from error
                    self.step += 1
                    self.logger.bar.update(1)
                    if (steps := clock.plan(self.step)) is not None:  # train.time_budget_minutes
                        self.logger.line(clock.set_steps(cfg, steps, self.step, self.dist))
                        self.planned_steps = total = self.logger.bar.total = cfg.total_steps
                    window_steps += 1
                    if not result.skipped:
                        self.logger.add({"total": result.loss, **result.losses})
                    if self.step % cfg.logging.log_every == 0 or self.step == total:
                        seconds = time.monotonic() - window_start
                        self._log_scalars(result, stage, index, window_steps / seconds)
                        window_start, window_steps = time.monotonic(), 0
                    self.checkpoints.poll()  # a background save that every rank has finished becomes visible
                    if self.step % cfg.train.checkpoint_every == 0 and self.step < total:
                        self.save()
                    if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.step < total:
                        self.sample_grid()
                    if self.evaluator is not None and self.evaluator.due(self.step) and self.step < total:
                        paused = time.monotonic()
                        self.evaluate()
                        window_start += time.monotonic() - paused  # steps/s counts training time only
                    self.stop_reason = f"stopped by {self.signals.received}" if self.signals.received else (
                        clock.limit_reached())
                    if not all_agree(self.stop_reason is None, self.dist):  # ranks stop at the same step
                        self.stop_reason = self.stop_reason or "stopped with the other ranks"
                        break
                if self.stop_reason is None:  # a last grid (if the run is long enough to have a schedule), eval
                    if 0 < cfg.logging.sample_every <= total and (grid := self.sample_grid()) is not None:
                        self.log(f"samples: {grid}")
                    if self.evaluator is not None:
                        self.evaluate()
                return self._finish(self.stop_reason or "done")
        finally:
            self.logger.close()

    def _log_scalars(self, result: StepResult, stage: StageConfig, index: int, steps_per_s: float) -> None:
        means = mean_across_ranks(self.logger.take_window(), self.dist)
        self.logger.bar.set_postfix(loss=f"{means.get('total', float('nan')):.4f}", lr=f"{result.lr:.1e}", refresh=False)
        self.logger.log(self.step, {**{f"loss/{k}": v for k, v in means.items()}, "lr": result.lr,
                                    "grad_norm": result.grad_norm, "train/steps_per_s": steps_per_s,
                                    "train/images_per_s": steps_per_s * stage.batch_size, "train/stage": index + 1,
                                    "train/bad_steps": self.bad_steps, "train/ema_decay": self.ema.current_decay(),
                                    "data/skipped_samples": sum(self.data.skipped.values())})

    @property
    def exit_code(self) -> int:
        """0 when the run ended normally; 128 + the signal number when a signal stopped it (130 Ctrl-C)."""
        return self.signals.exit_code if self.stop_reason and self.stop_reason.startswith("stopped by") else 0

    def save(self, wait: bool = False) -> Path | None:
        meta = {"planned_steps": self.planned_steps} if self.planned_steps else None
        path = self.checkpoints.save(self.step, training_state(self), self.config, meta, log=self.log)
        return self.checkpoints.wait() if wait and path is None else path

    def sample_grid(self) -> Path | None:
        """A grid of ``logging.sample_prompts`` with the EMA weights (:meth:`RunLogger.sample_grid`)."""
        _, stage = self.config.stage_at(max(self.step - 1, 0))
        pipe = Pipeline(self.ema.model, self.text_encoder, self.config, self.device)
        path = self.logger.sample_grid(pipe, self.data.sizes(stage), self.step, self.config.sampling.seed)
        if self.parallel == "fsdp":
            reshard(self.ema.model)  # the EMA update works on shards
        return path

    def evaluate(self) -> dict:
        """The ``eval:`` metrics of the EMA weights, with ``prx eval --data``'s code, on every rank (each
        its share of the held-out samples); rank 0 logs them and writes ``RUN/eval/step_N/real/results.json``."""
        self.checkpoints.wait()  # a checkpoint still being written becomes visible first: eval cannot lose it
        _, stage = self.config.stage_at(max(self.step - 1, 0))
        results = self.evaluator.run(self.ema.model, self.text_encoder, self.config, self.device, stage.resolution,
                                     sharded=self.parallel == "fsdp")
        if self.dist.is_main:
            saved = self.step % self.config.train.checkpoint_every == 0 or self.step == self.config.total_steps
            self.evaluator.report(self.logger, self.run_dir, self.step, results,
                                  self.run_dir / "checkpoints" / step_dir_name(self.step) if saved else None)
        return results

    def _out_of_memory(self, stage: StageConfig, error: torch.OutOfMemoryError) -> TrainingError:
        """One line for a step that ran out of device memory: where, torch's own first line, what to change, and
        the checkpoint the same command resumes from."""
        cfg = self.config.train
        micro = cfg.micro_batch_size or stage.batch_size // self.dist.world
        lines = str(error).strip().splitlines()
        fixes = [f"lower train.micro_batch_size (gradients accumulate to the batch of {stage.batch_size})"]
        if not cfg.activation_checkpointing:
            fixes.append("set train.activation_checkpointing=true")
        newest = self.checkpoints.last or self.resume_from
        return TrainingError(
            f"out of {self.device.type.upper()} memory in step {self.step} ({stage.resolution} px, micro-batch {micro} "
            f"per rank): {lines[0] if lines else 'out of memory'} To fit, {' or '.join(fixes)}; `prx bench CONFIG "
            f"--largest-micro-batch 32,16,8` tries micro-batches in turn. "
            + (f"The same command resumes from {newest.name}." if newest else "No checkpoint was written yet."))

    def _finish(self, reason: str) -> Path:
        unchanged = self.resume_from is not None and self.step == step_of(self.resume_from)
        self.checkpoints.wait()
        path = self.resume_from if unchanged else self.save(wait=True)
        if self.bad_steps:
            self.log(f"warning: {self.bad_steps} steps were skipped for non-finite loss or gradients")
        if self.data.skipped:
            self.log(f"warning: {sum(self.data.skipped.values())} samples could not be loaded and were replaced "
                     f"({', '.join(f'{k}: {v}' for k, v in self.data.skipped.items())})")
        self.log(f"{reason} at step {self.step}/{self.config.total_steps}")
        self.log(f"checkpoint: {self.run_dir / 'checkpoints' / 'latest'} -> {path.name}")
        return path
