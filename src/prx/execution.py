"""How a run executes, decided once: the device, the precision, the attention kernel, what compiles (the blocks,
the teachers, Muon's passes), static or dynamic shapes, CUDA graphs, activation checkpointing.

:func:`plan_training` turns the ``train:`` section and the hardware into an :class:`ExecutionPlan`; the trainer
prints it at start and writes it to ``RUN/execution.json``, ``prx bench`` and ``prx train --dry-run`` show it,
and :func:`prx.distributed.parallelize` applies it. Nothing else decides these. ``auto`` values resolve to what
was measured best where it was measured (``benchmarks/RESULTS.md``); elsewhere to the safe choice.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from prx.config import Config, StageConfig
from prx.config.run import TrainConfig
from prx.device import compile_works, fast_matmul_dtype
from prx.errors import ConfigError
from prx.model import token_count

STATIC_SHAPES_AUTO = 8  # train.compile_shapes auto: static on a GPU for at most this many block shapes
SHORT_CPU_SEQUENCE = 64  # train.attention auto: math on a CPU up to this many image tokens (compiled or bf16)

BlockShape = tuple[int, int, bool]  # (micro-batch, image tokens, routed)


@dataclass(frozen=True)
class ExecutionPlan:
    """What a run executes with (every field resolved: no ``auto`` left)."""

    device: str  # cpu | cuda | cuda:N
    world: int  # processes of the job
    parallel: str  # none | ddp | fsdp
    precision: str  # bf16 | fp32: the autocast dtype of the forward and backward (weights stay fp32)
    attention: str  # sdpa | math
    compile_blocks: bool
    static_shapes: bool  # the compiled blocks: a graph per image shape (else torch's dynamic shapes)
    cuda_graphs: bool  # the compiled blocks replayed as CUDA graphs
    compile_teachers: bool  # LPIPS-VGG and the DINO models compiled
    teacher_graphs: bool  # ... and replayed as CUDA graphs
    compile_optimizer: bool  # Muon's memory-bound passes compiled
    newton_schulz: str  # bf16 | fp32: the dtype of Muon's orthogonalisation
    activation_checkpointing: bool
    recompile_limit: int  # graphs each compiled function may make before dynamo runs it eagerly
    frozen_base: str = "none"  # none | bf16 | fp32: a LoRA run's frozen base weights (bf16 where it computes in bf16)
    cpu_offload: bool = False  # FSDP2's shards, gradients and optimizer states in host memory
    notes: tuple[str, ...] = ()  # settings asked for that this machine cannot take, and why

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def newton_schulz_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.newton_schulz == "bf16" else torch.float32

    @property
    def any_graphs(self) -> bool:
        return self.cuda_graphs or self.teacher_graphs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        ranks = f" × {self.world} ({self.parallel})" if self.world > 1 else ""
        compiled = [name for name, on in (("blocks", self.compile_blocks), ("teachers", self.compile_teachers),
                                          ("Muon", self.compile_optimizer)) if on]
        graphs = [name for name, on in (("blocks", self.cuda_graphs), ("teachers", self.teacher_graphs)) if on]
        parts = [f"{self.device}{ranks}", self.precision, f"{self.attention} attention",
                 f"compile {'+'.join(compiled) or 'off'}" + (f" ({'static' if self.static_shapes else 'dynamic'} "
                                                              f"shapes)" if self.compile_blocks else ""),
                 f"CUDA graphs {'+'.join(graphs) or 'off'}", f"Newton–Schulz in {self.newton_schulz}"]
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        if self.cpu_offload:
            parts.append("CPU offload")
        if self.frozen_base != "none":
            parts.append(f"LoRA on a frozen {self.frozen_base} base")
        return "execution: " + ", ".join(parts) + "".join(f"\n  note: {n}" for n in self.notes)


def block_shapes(cfg: Config, sizes: Callable[[StageConfig], list[tuple[int, int]]], world: int,
                 kept_tokens: Callable[[int], int] | None) -> set[BlockShape]:
    """(micro-batch, image tokens, routed) of each kind of block call the run makes: every stage's image shapes
    (``sizes(stage)``: its (width, height) buckets), with TREAD (``kept_tokens``: the router's count) the routed
    blocks' shorter rows too. Compiled for static shapes, the blocks build a graph for each."""
    shapes = set()
    for stage in cfg.stages:
        per_rank = stage.batch_size // world
        micro = cfg.train.micro_batch_size or per_rank
        routed = cfg.tricks(stage).tread and kept_tokens is not None
        for start in range(0, per_rank, micro):
            for width, height in sizes(stage):
                tokens = token_count(height, width, cfg.model.patch_size)
                shapes.add((min(micro, per_rank - start), tokens, False))
                if routed:
                    shapes.add((min(micro, per_rank - start), kept_tokens(tokens), True))
    return shapes


def steady_shapes(cfg: Config, world: int) -> bool:
    """Whether each step calls the blocks with one set of shapes per image shape: one micro-batch per rank in every
    stage and captions padded to one length (``text.min_length`` ≥ ``text.max_length``)."""
    micro = cfg.train.micro_batch_size
    one_micro_batch = not micro or all(micro >= stage.batch_size // world for stage in cfg.stages)
    return one_micro_batch and cfg.text.min_length >= cfg.text.max_length


def resolve_parallel(mode: str, world: int, lora: bool = False) -> str:
    """``train.parallel``: auto = FSDP2 when torchrun started several processes (DDP for LoRA: the adapters are
    small and the frozen base is shared with the EMA copy); one process has nothing to split."""
    if world <= 1:
        return "none"
    return ("ddp" if lora else "fsdp") if mode == "auto" else mode


def autocast_dtype(precision: str, device: torch.device, training: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` ('auto', 'bf16', 'fp32'); None = fp32. 'auto': bf16 on GPUs that
    support it; on a CPU, bf16 for training where bf16 matmuls are measured clearly faster than fp32
    (:func:`prx.device.fast_matmul_dtype`), and fp32 for inference (images equal to diffusers' fp32 pipeline)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and training and fast_matmul_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def attention_kernel(choice: str, device: torch.device, compiled: bool, dtype: torch.dtype | None,
                     image_tokens: int) -> str:
    """``train.attention``: 'auto' is 'math' on a CPU for short sequences when the blocks are compiled or run in
    bf16, where the fused kernel's forward and backward cost 2-3× the written-out attention's, and 'sdpa' elsewhere."""
    if choice != "auto":
        return choice
    short_cpu = device.type == "cpu" and image_tokens <= SHORT_CPU_SEQUENCE
    return "math" if short_cpu and (compiled or dtype == torch.bfloat16) else "sdpa"


def recompile_limit(shapes: set[BlockShape], muon_kinds: int = 0) -> int:
    """How many graphs each compiled function may make: past dynamo's limit (8 by default) the calls it has no graph
    for run eagerly, unnoticed but for one warning. Static shapes make a graph per block shape, twice where a routed
    and an unrouted call have the same token count; torch's dynamic shapes need fewer, but more than 8 on buckets
    (views, batch dimensions of the routed RoPE tables, stage changes). Compiled Muon makes about two per kind of
    stack of same-shape matrices."""
    return max(torch._dynamo.config.recompile_limit, 2 * len(shapes), 2 * muon_kinds + 8)


def apply_recompile_limit(plan: ExecutionPlan) -> None:
    """Room in dynamo's cache for the graphs the plan's compiled functions make (the one place it is set)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, plan.recompile_limit)


def _compiles(choice: str, device: torch.device, setting: str, auto: bool) -> bool:
    """An on/off/auto compile setting resolved: on and auto-when-``auto`` compile where torch.compile builds."""
    wanted = choice == "on" or (choice == "auto" and auto)
    return wanted and compile_works(device, setting)


def plan_training(cfg: Config, device: torch.device, world: int, shapes: set[BlockShape],
                  muon_kinds: int = 0) -> ExecutionPlan:
    """The execution of a training run of ``cfg`` on ``device`` with ``world`` processes whose blocks see ``shapes``."""
    t: TrainConfig = cfg.train
    notes = []
    parallel = resolve_parallel(t.parallel, world, cfg.lora.enabled)
    autocast = autocast_dtype(t.precision, device)
    gpu = device.type == "cuda"
    compile_blocks = _compiles(t.compile, device, "train.compile", auto=gpu)
    static = (gpu and len(shapes) <= STATIC_SHAPES_AUTO) if t.compile_shapes == "auto" else t.compile_shapes == "static"
    # CUDA graphs where they were measured: one GPU, static shapes, one micro-batch a step, one caption length
    graphs = gpu and compile_blocks and t.cuda_graphs != "off" and (
        t.cuda_graphs == "on" or (parallel == "none" and steady_shapes(cfg, world) and static))
    if t.cuda_graphs == "on" and not graphs:
        notes.append("train.cuda_graphs=on needs compiled blocks on a GPU: training without CUDA graphs")
    if t.cpu_offload and parallel != "fsdp":
        raise ConfigError("train.cpu_offload=true offloads FSDP2's shards: run under torchrun with 2 or more "
                          "processes and train.parallel=auto or fsdp (or set train.cpu_offload=false)")
    if graphs and parallel == "fsdp":
        raise ConfigError("train.cuda_graphs=on does not work with FSDP (it communicates inside the blocks): "
                          "use train.parallel=ddp or train.cuda_graphs=auto")
    compile_teachers = _compiles(t.compile_teachers, device, "train.compile_teachers", auto=gpu and compile_blocks)
    teacher_graphs = gpu and compile_teachers and (t.cuda_graphs_teachers == "on" or (
        t.cuda_graphs_teachers == "auto" and graphs))
    if t.cuda_graphs_teachers == "on" and not teacher_graphs:
        notes.append("train.cuda_graphs_teachers=on needs compiled teachers on a GPU: training without their CUDA "
                     "graphs")
    # Muon's passes compiled where the blocks are CUDA graphs: without them the compiled calls' host time costs more
    compile_optimizer = _compiles(t.compile_optimizer, device, "train.compile_optimizer", auto=graphs)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    longest = max((tokens for _, tokens, _ in shapes), default=0)
    return ExecutionPlan(
        device=str(device), world=world, parallel=parallel, precision="bf16" if autocast else "fp32",
        attention=attention_kernel(t.attention, device, compile_blocks, autocast, longest),
        compile_blocks=compile_blocks, static_shapes=static, cuda_graphs=graphs, compile_teachers=compile_teachers,
        teacher_graphs=teacher_graphs, compile_optimizer=compile_optimizer,
        newton_schulz="bf16" if fast_matmul_dtype(device.type) == torch.bfloat16 else "fp32",
        activation_checkpointing=t.activation_checkpointing, recompile_limit=recompile_limit(shapes, muon_kinds),
        frozen_base=frozen_base(cfg, autocast, gpu), cpu_offload=t.cpu_offload, notes=tuple(notes))


def frozen_base(cfg: Config, autocast: torch.dtype | None, gpu: bool) -> str:
    """A LoRA run's frozen weights: ``lora.base_dtype`` on a GPU that computes in bf16 (never updated, they need no
    fp32 master copy: half the memory), else fp32 (a CPU samples in fp32)."""
    if not cfg.lora.enabled:
        return "none"
    return "bf16" if gpu and autocast == torch.bfloat16 and cfg.lora.base_dtype == "bfloat16" else "fp32"


def plan_inference(cfg: Config, device: torch.device) -> ExecutionPlan:
    """Sampling and evaluation of a saved run: one process, eager, fp32 on a CPU (``train.precision`` on a GPU)."""
    autocast = autocast_dtype(cfg.train.precision, device, training=False)
    return ExecutionPlan(device=str(device), world=1, parallel="none", precision="bf16" if autocast else "fp32",
                         attention="sdpa", compile_blocks=False, static_shapes=False, cuda_graphs=False,
                         compile_teachers=False, teacher_graphs=False, compile_optimizer=False,
                         newton_schulz="fp32", activation_checkpointing=False, recompile_limit=0)
