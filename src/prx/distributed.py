"""Scale-out with PyTorch's own engine: ``torchrun`` launches, FSDP2 (``fully_shard`` per block,
then the root) or DDP parallelises, ``torch.compile`` and activation checkpointing are options.

The same config runs on 1 CPU process, N CPU processes (gloo), 1 GPU and N GPUs on any number of
nodes: with no torchrun environment everything here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import warnings
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn



@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> DistInfo:
    """Join the torchrun job if there is one. A rank that dies makes the others fail at their next
    collective within ``timeout_minutes`` instead of hanging (torchrun then stops the job)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
        # leave the job together at exit: a rank tearing down alone aborts the others
        atexit.register(shutdown)
    return DistInfo(rank, world, local_rank, device)


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun), before joining the job."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank0_outcome(message: str | None, info: DistInfo) -> str | None:
    """Rank 0's ``message`` (an error, or None for success) on every rank."""
    if not info.enabled:
        return message
    box = [message if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_agree(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` is true on every rank (e.g. "my loss is finite")."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def min_across_ranks(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def resolve_parallel(mode: str, info: DistInfo) -> str:
    if mode == "auto":
        return "fsdp" if info.enabled else "none"
    if mode != "none" and not info.enabled:
        return "none"  # one process: nothing to shard or synchronise
    return mode


def compiled(cfg, device: torch.device) -> bool:
    """Whether ``train.compile`` (``cfg`` is the ``train:`` section) compiles on ``device``: auto = on GPUs; on
    a CPU only where inductor's C++ backend builds (:func:`compiles_on`)."""
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return compile_on and compiles_on(device, "train.compile")


def compiles_on(device: torch.device, setting: str) -> bool:
    """Whether torch.compile builds for ``device``: on a CPU, where a one-line function compiles and runs
    (:func:`prx.runtime.cpu_compile_problem`); else a warning that names ``setting`` and the reason, and the
    run goes on without compiling."""
    if device.type != "cpu":
        return True
    from prx.runtime import cpu_compile_problem

    problem = cpu_compile_problem()
    if problem is not None:
        warnings.warn(f"{setting}=on but torch.compile cannot build for this CPU ({problem}): training without "
                      f"compiling. Install a C++ compiler with OpenMP and Python's headers (e.g. g++ and python3-dev), "
                      f"or set {setting}=off to silence this", RuntimeWarning, stacklevel=3)
    return problem is None


STATIC_SHAPES_AUTO = 8  # train.compile_shapes auto: static on a GPU for at most this many block shapes


def static_block_shapes(choice: str, device: torch.device, block_shapes: set) -> bool:
    """Whether the blocks compile for static image shapes (``train.compile_shapes``): static, dynamic, or auto =
    static on a GPU when the run's block calls take at most 8 shapes (square images: 2 per stage with TREAD).

    dynamic is torch's own choice (``dynamic=None``): a graph becomes dynamic once it sees a second shape, and
    TREAD's routed blocks always show it one. The seed recipe's step on an H200 then took 0.216 s against
    0.196 s static (1.10×): the host launches a dynamic graph's kernels more slowly. Bucketed photos (11 shapes
    at 512 px, 23 at 1024) compile a static graph for each, which ``static`` chooses."""
    if choice == "auto":
        return device.type == "cuda" and len(block_shapes) <= STATIC_SHAPES_AUTO
    return choice == "static"


def block_graphs(cfg, device: torch.device, mode: str, block_shapes: set, steady_shapes: bool) -> bool:
    """Whether the compiled blocks replay as CUDA graphs (``train.cuda_graphs``; ``cfg`` is the ``train:`` section,
    ``mode`` the resolved ``train.parallel``): on or off where the blocks compile on a GPU, and auto = where it was
    measured: one GPU (no DDP or FSDP), blocks compiled for static shapes, and ``steady_shapes`` (one micro-batch a
    step, captions padded to one length: a graph is recorded for each new caption length). The seed recipe's step on
    an H200 was 1.13× and 1.21× faster with them, in two runs, with the same losses step by step; DDP, gradient
    accumulation, varying caption lengths and bucketed shapes are not measured yet (``on`` takes them)."""
    if cfg.cuda_graphs == "off" or device.type != "cuda" or not compiled(cfg, device):
        return False
    if cfg.cuda_graphs == "on":
        return True
    return mode == "none" and steady_shapes and static_block_shapes(cfg.compile_shapes, device, block_shapes)


def teacher_graphs(choice: str, teachers_compiled: bool, device: torch.device, blocks_as_graphs: bool) -> bool:
    """Whether the compiled teachers replay as CUDA graphs (``train.cuda_graphs_teachers``, ``choice``): on =
    wherever they compile on a GPU (they are never sharded, so FSDP too), auto = with the blocks' graphs. On an
    H200 their graphs cut the perceptual and REPA phases' host time from 23 + 12 to 7 + 3 ms a step and peak
    memory from 12.5 to 9.0 GiB, with the same losses (1.01× when the text phase still bound the host)."""
    if not teachers_compiled or device.type != "cuda":
        return False
    return choice == "on" or (choice == "auto" and blocks_as_graphs)


def recompile_limit(block_shapes: set[tuple[int, int, bool]]) -> int:
    """How many graphs each compiled function of a run (a block, a teacher) may make: past dynamo's recompile limit
    (8 by default) the calls it has no graph for run eagerly, unnoticed but for one warning. Compiled for static
    shapes, the blocks make a graph per shape, twice where a routed and an unrouted call have the same token count.
    torch's dynamic shapes need fewer, but more than 8 on buckets: a tall, a square and a wide bucket of the
    speedrun's two stages, routed, with another micro-batch at 1024 px, made 10 block graphs (the routed rows' RoPE
    tables have a batch dimension, the others' do not; some inputs are views; the stage changes the batch), and the
    DINOv2 perceptual teacher, called with and without gradients, 10 over all 34 buckets (LPIPS-VGG 4, REPA's 3)."""
    return 2 * len(block_shapes)


def compiles_also(choice: str, cfg, device: torch.device) -> bool:
    """``train.compile_teachers`` (``choice``): on, off, or auto = where the blocks compile (:func:`compiled`)
    on a GPU."""
    if choice == "on":
        return compiles_on(device, "train.compile_teachers")
    return choice == "auto" and device.type == "cuda" and compiled(cfg, device)


def parallelize(model: nn.Module, ema_model: nn.Module, projector: nn.Module | None, cfg, info: DistInfo,
                param_dtype: torch.dtype | None, block_shapes: set[tuple[int, int, bool]], steady_shapes: bool = False
                ) -> tuple[str, nn.Module, nn.Module | None, bool]:
    """The one place a run's modules are made parallel, in torchtitan's order: activation
    checkpointing → compile each block → FSDP2 per block, then the root (the EMA copy and the REPA
    projector alike) — or DDP. ``cfg`` is the run's ``train:`` section.

    ``block_shapes``: (micro-batch, image tokens, routed) of the block calls the run makes (``prx.train.block_shapes``),
    which decide ``train.compile_shapes: auto``; ``steady_shapes``: see :func:`block_graphs`. Returns
    (mode, the module the step calls, the projector the step calls, whether the blocks replay as CUDA graphs). FSDP2
    shards in place; DDP wraps, so the step calls the wrappers while checkpoints and the optimizer see the modules.
    """
    mode = resolve_parallel(cfg.parallel, info)
    model.activation_checkpointing = cfg.activation_checkpointing
    compile_on = compiled(cfg, info.device)
    graphs = block_graphs(cfg, info.device, mode, block_shapes, steady_shapes)
    if cfg.cuda_graphs == "on" and not graphs:
        warnings.warn("train.cuda_graphs=on needs compiled blocks on a GPU: training without CUDA graphs",
                      RuntimeWarning, stacklevel=2)
    if graphs and mode == "fsdp":
        from prx.errors import ConfigError

        raise ConfigError("train.cuda_graphs=on does not work with FSDP (it communicates inside the blocks): "
                          "use train.parallel=ddp or train.cuda_graphs=auto")
    from prx.runtime import attention_kernel

    kernel = attention_kernel(cfg.attention, info.device, compile_on, param_dtype, max(n for _, n, _ in block_shapes))
    for block in model.blocks:
        block.attention = kernel
    if compile_on:  # the loop over blocks stays in Python
        static = static_block_shapes(cfg.compile_shapes, info.device, block_shapes)
        for block in model.blocks:  # dynamic: torch's choice, static until a second shape is seen
            block.dynamic_text_length = static  # the caption length stays the one dynamic size
            block.compile_compute(mode="reduce-overhead" if graphs else None, dynamic=False if static else None)
    if mode == "fsdp":
        for module in (model, ema_model, projector):
            if module is not None:
                _fully_shard(module, info, param_dtype)
    if mode == "ddp":
        return mode, _ddp(model, info), _ddp(projector, info) if projector is not None else None, graphs
    return mode, model, projector, graphs


def gradient_sync(modules: list[nn.Module], mode: str, last_micro_batch: bool) -> contextlib.ExitStack:
    """Gradient accumulation: communicate only in the backward pass of the step's last micro-batch
    (``modules`` as :func:`parallelize` returned them)."""
    stack = contextlib.ExitStack()
    for module in modules:
        if mode == "fsdp":
            module.set_requires_gradient_sync(last_micro_batch)
        elif mode == "ddp" and not last_micro_batch:
            stack.enter_context(module.no_sync())
    return stack


def _fully_shard(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None) -> None:
    """FSDP2: each block its own unit (if the module has blocks), then the root. Parameters stay
    fp32 (the master weights); compute runs in ``param_dtype`` and gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def reshard(model: nn.Module) -> None:
    """Free the full parameters FSDP2 keeps after a forward pass without backward (sampling with the
    EMA copy: the root module's parameters stay unsharded), so the shards are the parameters again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gathered_for_inference(model: nn.Module):
    """Inside, an FSDP2-sharded model (the EMA copy) holds its full parameters on every rank and runs
    forward passes with no collective at all, so ranks may run different numbers of them (uneven
    evaluation shares, skipped samples). Entering all-gathers every unit once (a collective: every rank
    together); leaving reshards and restores resharding after forward (blocks on, the root off, as
    FSDP2 sets them), so the EMA update sees shards again. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a grad norm computed over shards), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shutdown() -> None:
    """Leave the job cleanly: every rank finishes before the process group goes away."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
