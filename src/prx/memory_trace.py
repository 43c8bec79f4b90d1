"""The denoiser's training step on fake tensors: how many bytes are alive at its peak, without allocating them.

The real prx model (with its peft adapters, in the dtypes the trainer uses) runs one step's forward and backward on
fake tensors (``FakeTensorMode``: shapes and dtypes, no data), under bf16 autocast where the run computes in bf16,
with activation checkpointing where asked; a dispatch-level tracker (:class:`LiveTensors`) sums the bytes of the
storages alive after every operation, as an allocator without a cache would. The peak covers the weights, the
gradients as they appear, every saved activation, the autocast copies of fp32 weights and the backward's
temporaries. It runs on the CPU's kernels with the GPU's text layout (every caption token, padded; prx packs the real
ones on CPUs only); torch picks flash attention on both, which saves the output and the log-sum-exp, not the score
matrix. :func:`measured_step_peak` runs the same step for real on a CPU and reads the CPU allocator's own count
(:func:`cpu_allocations`): the check of the trace.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from prx.lora import add_lora
from prx.model import build_model

# --------------------------------------------------------------------------------------------
# Counting live tensors on fake tensors
# --------------------------------------------------------------------------------------------


class LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every storage alive after each operation (each storage once, however many views), and
    keeps the peak, with the gradients' share at that moment. Works on fake tensors (no data). A storage leaves
    the sum when it dies (a weak reference's callback: torch keeps one Python object per live storage)."""

    def __init__(self, parameters: list[nn.Parameter]):
        super().__init__()
        self.parameters = parameters
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = self.grads_at_peak = 0
        self.window = None  # the part of the step running now; each window keeps its own peak
        self.windows: dict[object, tuple[int, int]] = {}  # window → (peak, gradients at it)

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            nbytes = storage.nbytes()
            self.live[key] = weakref.ref(storage, functools.partial(self._died, key, nbytes))
            self.current += nbytes

    def _died(self, key: int, nbytes: int, _ref) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def grad_bytes(self) -> int:
        storages = {p.grad.untyped_storage()._cdata: p.grad.untyped_storage().nbytes()
                    for p in self.parameters if p.grad is not None}
        return sum(storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        if self.current > self.peak:
            self.peak, self.grads_at_peak = self.current, self.grad_bytes()
        if self.window is not None and self.current > self.windows.get(self.window, (-1, 0))[0]:
            self.windows[self.window] = (self.current, self.grad_bytes())
        return out


# --------------------------------------------------------------------------------------------
# The denoiser's step, traced
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTrace:
    """Bytes of one optimizer step's micro-batches, forward and backward (no optimizer step)."""

    params: int  # parameters and buffers, as traced
    peak: int  # peak alive, parameters included
    grads_at_peak: int  # of which gradients
    grads: int  # all gradients after the backward
    # (micro-batch, part) → (peak, gradients at it); parts: forward, then the backward of the last block (top0),
    # the one before (top1), the middle blocks, block 1 (bottom1) and block 0 with what follows (bottom0)
    windows: tuple = ()

    @property
    def activations(self) -> int:
        """Saved activations, autocast weight copies and the backward's temporaries at the peak."""
        return self.peak - self.params - self.grads_at_peak


_TRACES: dict[str, StepTrace] = {}


def trace_step(model_cfg, *, lora=None, height: int, width: int, micro_batch: int, text_tokens: int,
               micro_batches: int = 1, checkpointing: bool = False, autocast: torch.dtype | None = torch.bfloat16,
               weights: str = "master", exact: bool = False) -> StepTrace:
    """Trace ``micro_batches`` forward + backward passes of prx's PRX (with ``lora`` adapters if given) on fake
    tensors and return the peak. ``weights``: ``master`` = the trained weights in fp32 (a LoRA base in
    ``lora.base_dtype``), as a run on one device or DDP holds them; ``compute`` = every weight in the autocast dtype,
    as FSDP2's gathered blocks are (their sharded fp32 masters are counted apart).

    Deep models are traced with 4 and 5 blocks and extrapolated (``exact=True`` traces every block; the tests check
    both agree to the byte). The blocks are identical, so what is alive at a given point of the step is linear in
    their number: in the forward, in the backward of the last two blocks and of the first two. In the backward of
    the blocks between, it is linear in the block's index too (one block's activations freed, one block's gradients
    made per block), so its largest value is at an end of that stretch, next to those windows: the peak is the
    largest of the extrapolated windows."""
    args = (lora, height, width, micro_batch, text_tokens, micro_batches, checkpointing, autocast, weights)
    if exact or model_cfg.num_layers <= 5:
        key = repr((model_cfg, *args))
        if key not in _TRACES:
            _TRACES[key] = _trace(model_cfg, *args)
        return _TRACES[key]
    four, five = (trace_step(replace(model_cfg, num_layers=n), lora=lora, height=height, width=width,
                             micro_batch=micro_batch, text_tokens=text_tokens, micro_batches=micro_batches,
                             checkpointing=checkpointing, autocast=autocast, weights=weights) for n in (4, 5))
    more = model_cfg.num_layers - 4

    def line(a: int, b: int) -> int:
        return a + more * (b - a)

    at4, at5 = dict(four.windows), dict(five.windows)
    windows = tuple((key, (line(at4[key][0], at5[key][0]), line(at4[key][1], at5[key][1])))
                    for key in at4 if key in at5)
    _, (peak, grads_at_peak) = max(windows, key=lambda w: w[1][0])
    return StepTrace(line(four.params, five.params), peak, grads_at_peak, line(four.grads, five.grads), windows)


def _window(block: int, blocks: int) -> str:
    return {blocks - 1: "top0", blocks - 2: "top1", 1: "bottom1", 0: "bottom0"}.get(block, "middle")


def _trace(model_cfg, lora, height, width, micro_batch, text_tokens, micro_batches, checkpointing, autocast,
           weights) -> StepTrace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):  # built and adapted on the meta device, then given fake CPU tensors of its shapes
        model = build_model(model_cfg)
        if lora is not None:
            add_lora(model, lora, base_dtype=getattr(torch, lora.base_dtype) if autocast is not None else None)
    model.pack_text = False  # prx packs the real caption tokens on CPUs only; a plan is for the GPU's padded layout
    with FakeTensorMode(), torch.random.fork_rng(devices=[]):
        _to_fake(model, autocast if weights == "compute" and autocast is not None else None)
        model.activation_checkpointing = checkpointing
        trained = [p for p in model.parameters() if p.requires_grad]
        tracker = LiveTensors(trained)
        step = [0]

        def mark_backward(block_index: int):  # a block's output gradient arrives: that block's backward begins
            def hook(module, inputs, output):
                if output.requires_grad and torch.is_grad_enabled():
                    window = (step[0], _window(block_index, len(model.blocks)))
                    output.register_hook(lambda grad: setattr(tracker, "window", window))
            return hook

        handles = [block.register_forward_hook(mark_backward(i)) for i, block in enumerate(model.blocks)]
        with tracker:
            for tensor in [*model.parameters(), *model.buffers()]:
                tracker.add(tensor)
            params = tracker.current
            for step[0] in range(micro_batches):
                tracker.window = (step[0], "forward")
                _micro_batch_step(model, micro_batch, height, width, text_tokens, model_cfg.text_dim, autocast)
            grads = tracker.grad_bytes()
        for handle in handles:
            handle.remove()
        return StepTrace(params=params, peak=tracker.peak, grads_at_peak=tracker.grads_at_peak, grads=grads,
                         windows=tuple(tracker.windows.items()))


def _to_fake(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace a meta model's parameters and buffers by CPU tensors of the ambient fake mode (same shapes,
    requires_grad and dtype, or ``dtype``): peft's and nn.Module's own ``.to()`` cannot swap fake parameters."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _micro_batch_step(model, batch: int, height: int, width: int, text_tokens: int, text_dim: int, autocast) -> None:
    """One micro-batch as the trainer runs it: noisy image, x0 prediction, the loss in velocity space, backward."""
    x0 = torch.randn(batch, 3, height, width)
    t = torch.rand(batch)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * torch.randn_like(x0)
    text, mask = torch.randn(batch, text_tokens, text_dim), torch.ones(batch, text_tokens, dtype=torch.bool)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        pred = model(x_t, t, text, mask).x0
    clamp = t.clamp(min=0.05)[:, None, None, None]
    loss = ((x_t - pred) / clamp - (x_t - x0) / clamp).square().mean()
    loss.backward()


# --------------------------------------------------------------------------------------------
# Parameters, counted on the meta device
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter of the (adapted) model
    trained: int  # what the optimizer updates (the adapters of a LoRA model)
    trained_2d: int  # of which 2D block matrices (Muon's group)
    largest_block: int  # parameters of the largest block (FSDP2's unit)
    outside_blocks: int  # embeddings and final layer (FSDP2's root unit)
    largest_same_shape: int  # the largest group of same-shape trained matrices (prx's Muon stacks them)
    largest_trained: int  # the largest trained tensor


_COUNTS: dict[str, ParamCounts] = {}


def count_params(model_cfg, lora=None) -> ParamCounts:
    """The parameter counts of a model config (with adapters), on the meta device."""
    key = repr((model_cfg, lora))
    if key not in _COUNTS:
        _COUNTS[key] = _count_params(model_cfg, lora)
    return _COUNTS[key]


def _count_params(model_cfg, lora) -> ParamCounts:
    with torch.device("meta"):
        model = build_model(model_cfg)
        if lora is not None:
            add_lora(model, lora)
    named = dict(model.named_parameters())
    trained = {n: p for n, p in named.items() if p.requires_grad}
    shapes: dict[tuple, int] = {}
    for n, p in trained.items():
        if p.ndim == 2 and n.startswith("blocks."):
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + p.numel()
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    return ParamCounts(
        total=sum(p.numel() for p in named.values()),
        trained=sum(p.numel() for p in trained.values()),
        trained_2d=sum(p.numel() for n, p in trained.items() if p.ndim == 2 and n.startswith("blocks.")),
        largest_block=max(blocks),
        outside_blocks=sum(p.numel() for n, p in named.items() if not n.startswith("blocks.")),
        largest_same_shape=max(shapes.values(), default=0),
        largest_trained=max((p.numel() for p in trained.values()), default=0),
    )


# --------------------------------------------------------------------------------------------
# Measuring a real step on a CPU (the check of trace_step)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_allocations():
    """The CPU allocator's running total inside the block, through torch's profiler (``profile_memory=True``
    reports every allocation and free with c10's total of allocated bytes). Yields a dict whose ``peak`` is set on
    exit: the largest total reached above the total at the start, i.e. counting what was allocated inside the block
    (c10 tracks allocations only while a profiler records memory)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    result = {"peak": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if memory:  # c10 keeps its running total across profiler sessions: count from where this one started
        start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
        result["peak"] = max(m["Total Allocated"] for m in memory) - start


def measured_step_peak(model_cfg, *, lora=None, height: int, width: int, micro_batch: int, text_tokens: int,
                       micro_batches: int = 1, checkpointing: bool = False, autocast: torch.dtype | None = None,
                       optimizer_steps: int = 0) -> int:
    """The CPU allocator's peak while ``micro_batches`` real forward + backward passes run on the CPU, plus the
    model's own bytes (its weights, and adapters, built before): what :func:`trace_step` predicts. With
    ``optimizer_steps``, that many AdamW steps of ``micro_batches`` each (multi-tensor, as on a GPU; gradients set to
    None between steps): what :func:`plan_memory` predicts for one device without EMA, less its estimated parts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_cfg)
        if lora is not None:
            add_lora(model, lora, base_dtype=getattr(torch, lora.base_dtype) if autocast is not None else None)
    model.activation_checkpointing = checkpointing
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, foreach=True) if optimizer_steps else None
    with cpu_allocations() as measured:  # counts what is allocated inside only
        for _ in range(max(1, optimizer_steps)):
            for _ in range(micro_batches):
                _micro_batch_step(model, micro_batch, height, width, text_tokens, model_cfg.text_dim, autocast)
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return sum(storages.values()) + measured["peak"]
