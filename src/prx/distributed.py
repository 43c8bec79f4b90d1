"""Scale-out with PyTorch's own engine: ``torchrun`` launches, FSDP2 (``fully_shard`` per block,
then the root) or DDP parallelises, ``torch.compile`` and activation checkpointing are options.

The same config runs on 1 CPU process, N CPU processes (gloo), 1 GPU and N GPUs on any number of
nodes: with no torchrun environment everything here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from prx.execution import ExecutionPlan, apply_recompile_limit


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


def agree_and_mean(flag: bool, value: float, info: DistInfo) -> tuple[bool, float]:
    """(``flag`` is true on every rank, the mean of ``value`` over the ranks), in one collective."""
    if not info.enabled:
        return flag, value
    t = torch.tensor([0.0 if flag else 1.0, value if flag else 0.0], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return bool(t[0].item() < 0.5), float(t[1].item()) / info.world


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


def parallelize(model: nn.Module, ema_model: nn.Module, projector: nn.Module | None, teachers: list[nn.Module],
                plan: ExecutionPlan, info: DistInfo) -> tuple[nn.Module, nn.Module | None]:
    """Apply a run's :class:`~prx.execution.ExecutionPlan` to its modules, in torchtitan's order: the attention
    kernel and activation checkpointing → compile each block (and the frozen teachers) → FSDP2 per block, then the
    root (the EMA copy and the REPA projector alike) — or DDP.

    Returns (the module the step calls, the projector the step calls). FSDP2 shards in place; DDP wraps, so the step
    calls the wrappers while checkpoints and the optimizer see the modules.
    """
    apply_recompile_limit(plan)  # room for the graphs the compiled blocks, teachers and Muon passes make
    model.activation_checkpointing = plan.activation_checkpointing
    for block in model.blocks:
        block.attention = plan.attention
    if plan.compile_blocks:  # the loop over blocks stays in Python
        for block in model.blocks:
            block.dynamic_text_length = plan.static_shapes  # the caption length stays the one dynamic size
            block.compile_compute(mode="reduce-overhead" if plan.cuda_graphs else None,
                                  dynamic=False if plan.static_shapes else None)
    if plan.compile_teachers:  # each called as before, compiled in place
        for net in teachers:
            net.compile(mode="reduce-overhead" if plan.teacher_graphs else None)
    if plan.parallel == "fsdp":
        for module in (model, ema_model, projector):
            if module is not None:
                _fully_shard(module, info, plan.autocast, plan.cpu_offload)
    if plan.parallel == "ddp":
        return _ddp(model, info), _ddp(projector, info) if projector is not None else None
    return model, projector


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


def _fully_shard(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None, cpu_offload: bool = False) -> None:
    """FSDP2: each block its own unit (if the module has blocks), then the root. Parameters stay
    fp32 (the master weights); compute runs in ``param_dtype`` and gradients are reduced in fp32. ``cpu_offload``:
    the shards, their gradients and the optimizer's states live in host memory, copied in for each unit's compute."""
    mesh = init_device_mesh(info.device.type, (info.world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)


def _ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def reshard(model: nn.Module) -> None:
    """Free the full parameters FSDP2 keeps after a forward pass without backward (sampling with the
    EMA copy: the root module's parameters stay unsharded), so the shards are the parameters again."""
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
