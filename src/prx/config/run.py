"""How a run runs: ``train:`` (the loop, its resolution stages, scale-out and checkpoints) and ``logging:``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prx.config.rules import at_least, check, one_of, positive


@dataclass
class StageConfig:
    """One resolution stage of a run; which of the configured losses and routing are on."""

    resolution: int = positive(512)
    steps: int = at_least(1000, 1)
    batch_size: int = at_least(64, 1)
    tread: bool = True
    repa: bool = True
    perceptual: bool = True


@dataclass(frozen=True)
class StageTricks:
    """Which of the recipe's tricks are on in a stage: configured (weight or ratio > 0) and enabled there."""

    tread: bool
    repa: bool
    lpips: bool
    dino: bool

    @property
    def perceptual(self) -> bool:
        return self.lpips or self.dino


@dataclass
class TrainConfig:
    """``train:`` the loop, its scale-out and its checkpoints."""

    steps: int = at_least(100_000, 1)
    batch_size: int = at_least(1024, 1)
    micro_batch_size: int = at_least(0, 0, hint=" (0 = the whole batch)")  # gradients accumulate to batch_size
    # Resolution stages; when set they replace data.resolution, train.steps and train.batch_size.
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = one_of("auto", "bf16", "fp32")  # auto: bf16 on GPU, fp32 on CPU; weights stay fp32
    parallel: str = one_of("auto", "fsdp", "ddp", "none")  # auto: FSDP2 when torchrun starts several processes
    compile: str = one_of("auto", "on", "off")  # torch.compile each block: auto = on GPU
    # torch.compile the frozen networks too (LPIPS-VGG, the DINO models): auto = where the blocks compile on a GPU
    compile_teachers: str = one_of("auto", "on", "off")
    # torch.compile Muon's memory-bound work (momentum, the stacks, casts, the update) into two passes per stack of
    # same-shape matrices: auto = with the blocks as CUDA graphs (without them the compiled calls' host time costs more)
    compile_optimizer: str = one_of("auto", "on", "off")
    # the compiled blocks' image shapes: static = a graph per shape (the caption length stays dynamic), dynamic =
    # torch's choice (dynamic from the second shape on); auto = static on a GPU for at most 8 block shapes, else dynamic
    compile_shapes: str = one_of("auto", "static", "dynamic")
    # replay each compiled block as a CUDA graph (torch.compile mode="reduce-overhead"): one launch per block in
    # place of ~50, for a GPU that waits on the host. GPU only; not with FSDP (its hooks communicate in the block).
    # auto = on one GPU with static shapes, one micro-batch a step and captions padded to one length (text.min_length
    # = text.max_length), where it was measured; on = also with DDP, micro-batches, varying caption lengths or dynamic
    # shapes (not measured); true/false read as on/off
    cuda_graphs: str = one_of("auto", "on", "off")
    # replay the compiled teachers (LPIPS-VGG, the DINO models) as CUDA graphs too (they are never sharded: FSDP
    # takes them as well). auto = with the blocks' CUDA graphs; on = wherever the teachers compile on a GPU
    cuda_graphs_teachers: str = one_of("auto", "on", "off")
    # the attention kernel: sdpa (torch's fused kernel) or math (written out, fused by inductor). auto: math on a
    # CPU for ≤ 64 image tokens when compiled or in bf16, where the fused kernel's backward is slow; sdpa elsewhere
    attention: str = one_of("auto", "sdpa", "math")
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # FSDP2 keeps the sharded weights, gradients and optimizer states in host memory (CPUOffloadPolicy): a model
    # the GPUs cannot hold (`prx plan` says when), at slower steps; FSDP2 only (torchrun, 2 or more processes)
    cpu_offload: bool = False
    async_checkpoint: bool = True  # write checkpoints in the background (visible once complete)
    timeout_minutes: float = positive(10.0)  # a collective that waits longer (a dead rank) fails the job
    num_threads: int = at_least(0, 0)  # CPU threads for torch; 0 = torch's default
    checkpoint_every: int = at_least(1000, 1)
    keep_checkpoints: int = at_least(2, 1)
    time_limit_minutes: float = at_least(0.0, 0)  # stop (with a checkpoint) after this long; 0 = no limit
    # train for about this long: the measured step rate sets the step count (at most train.steps; estimated
    # after 40 steps, measured again halfway and late, fixed before the decay), so the LR schedule's decay
    # ends with the budget; 0 = exactly train.steps
    time_budget_minutes: float = at_least(0.0, 0)
    # the steps this config needs to reach its published quality (0 = not stated): when the time budget buys
    # fewer on this machine, the line that fixes the count says so, with the budget that would buy them
    recommended_steps: int = at_least(0, 0)
    max_bad_steps: int = at_least(20, 0)  # bad steps tolerated (skipped) before the run stops
    # a step whose flow loss or gradient norm exceeds this many times the median of the last 50 good steps of its
    # stage has blown up: it is bad, like a non-finite one (its update dropped, no checkpoint of it); 0 = off
    divergence_factor: float = at_least(1000.0, 0)

    # a resumed run keeps its seed: the randomness of step n (data, noise, routes) derives from it.
    # The stages are checked by resume_changes: those that have started keep resolution and batch size.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("seed",)

    def check(self, run) -> None:
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
              f"train.device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        check(not (self.time_budget_minutes and self.stages), "train.time_budget_minutes sets the step count of a "
              "single-stage run: drop train.stages or set the stages' steps yourself")
        check(not (self.time_limit_minutes and self.time_limit_minutes < self.time_budget_minutes),
              f"train.time_limit_minutes={self.time_limit_minutes:g} (the safety net that stops a run) is shorter than "
              f"train.time_budget_minutes={self.time_budget_minutes:g}: the run would stop before its LR decay ends. "
              f"Raise it too (e.g. train.time_limit_minutes={self.time_budget_minutes * 1.3:g}) or set 0 for no limit")


# the sample grids' prompts on the shapes world: one object per colour, shape and position, and two relations
SHAPES_PROMPTS = ("a red circle in the top left", "a blue square in the bottom right", "a green triangle in the center",
                  "a yellow circle in the top right", "a purple square in the bottom left",
                  "an orange triangle in the top left", "a blue circle to the left of a red square",
                  "a green square above an orange circle")
NUM_DATA_PROMPTS = 8  # captions a grid takes from the data


@dataclass
class LoggingConfig:
    """``logging:`` what the run reports, where, and how often."""

    log_every: int = at_least(10, 1)
    sample_every: int = at_least(1000, 0, hint=" (0 disables)")  # sample grid of the fixed prompts (EMA weights)
    sample_steps: int = at_least(25, 1)
    # the grid's prompts; null: the data's own, recorded in the run's config: the shapes world's (SHAPES_PROMPTS), or
    # captions of the held-out shards (eval.data), else of the training data; []: no grid
    sample_prompts: list[str] | None = None
    tensorboard: bool = True
    progress_bar: bool = True
    # Weights & Biases (pip install 'prx-speedrun[wandb]'): every logged scalar, the sample grids, the evaluations
    wandb: bool = False
    wandb_project: str = "prx"
    wandb_entity: str | None = None  # null: your default entity
    wandb_run_name: str | None = None  # null: the run directory's name
    wandb_mode: str | None = None  # online | offline | disabled; null: $WANDB_MODE, else online

    def check(self, run) -> None:
        check(self.wandb_mode in (None, "online", "offline", "disabled"),
              f"logging.wandb_mode must be 'online', 'offline' or 'disabled' (or null for $WANDB_MODE), "
              f"got '{self.wandb_mode}'")
