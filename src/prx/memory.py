"""Peak memory per rank of a training step, planned without allocating the model: which micro-batch, activation
checkpointing, text encoder placement, FSDP2 sharding and CPU offload a fine-tune (or a run) needs on a GPU.

How each part is found:

- **The denoiser's step is traced, not modelled.** The real prx model (with its peft adapters, in the dtypes the
  trainer uses) runs one step's forward and backward on fake tensors (``FakeTensorMode``: shapes and dtypes, no
  data), under bf16 autocast where the run computes in bf16, with activation checkpointing where asked, and a
  dispatch-level tracker sums the bytes of the tensors alive after every operation, as an allocator without a
  cache would. The peak covers the weights, the gradients as they appear, every saved activation, the autocast
  copies of fp32 weights and the backward's temporaries. It takes seconds for a 7B model on a laptop. Traced on
  the CPU's kernels with the GPU's text layout (all caption tokens, padded; prx packs the real ones on CPUs only);
  torch picks flash attention on both, which saves the output and the log-sum-exp, not the score matrix.
- **Counted exactly on the meta device**: parameters (frozen, trained), per block, per shape.
- **Formulas**: optimizer states (AdamW 2 fp32 per trained parameter; Muon 1 for 2D matrices), the EMA copy, FSDP2's
  sharding (÷ world size, plus two blocks' gathered weights and one block's full gradients in flight, plus the
  unsharded fp32 gradients FSDP2 accumulates without syncing when micro-batches accumulate), DDP's gradient
  buckets, the optimizer step's temporaries, CPU offload (sharded weights, gradients and states on the host).
- **Estimates, labelled as such**: the text encoder's and teachers' forward working memory, CUDA-graph pools, the
  CUDA context and workspaces, and a reserve for the caching allocator's fragmentation.

:func:`plan_memory` returns a :class:`Plan` (``describe()`` prints its table); :func:`trace_step` is the traced part,
checked against the CPU allocator's own count of a real step (``benchmarks/finetune_memory.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field, replace
from unittest import mock

import torch
from torch import nn

from prx.errors import ConfigError

GiB = 1024**3
CUDA_CONTEXT = int(0.8 * GiB)  # estimate: CUDA context, cuBLAS/cuDNN workspaces, kernels (not torch's allocator)
NCCL_BUFFERS = int(0.5 * GiB)  # estimate: NCCL's communication buffers when several ranks train
FRAGMENTATION = 0.05  # estimate: the caching allocator's reserve beyond what is allocated, share of the GPU


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
    import prx.model
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prx.lora import add_lora

    # prx packs the real caption tokens on CPUs only (prx.model.packs_text); a plan is for the GPU's padded layout
    gpu_layout = mock.patch.object(prx.model, "packs_text", lambda device: False)
    with torch.device("meta"):  # built and adapted on the meta device, then given fake CPU tensors of its shapes
        model = prx.model.build_model(model_cfg)
        if lora is not None:
            add_lora(model, lora, base_dtype=getattr(torch, lora.base_dtype) if autocast is not None else None)
    with FakeTensorMode(), gpu_layout, torch.random.fork_rng(devices=[]):
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
    import prx.model
    from prx.lora import add_lora

    with torch.device("meta"):
        model = prx.model.build_model(model_cfg)
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
# What else a rank holds: the text encoder, teachers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder's size: its parameters and the widths that set its forward's working memory."""

    name: str
    params: int
    hidden: int
    intermediate: int
    dtype_bytes: int = 2  # bf16 (text.dtype)

    @property
    def weights(self) -> int:
        return self.params * self.dtype_bytes

    def forward(self, batch: int, tokens: int) -> int:
        """Estimate: the no-grad forward's working memory, a few hidden states and one MLP's intermediates."""
        return batch * tokens * (4 * self.hidden + 3 * self.intermediate) * self.dtype_bytes


def text_encoder_spec(config, name: str | None = None, dtype_bytes: int = 2) -> TextEncoderSpec:
    """The spec of a transformers text encoder from its config (a ``PretrainedConfig``), counted on the meta
    device (nothing is allocated or downloaded)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    inner = getattr(config, "text_config", config)
    return TextEncoderSpec(name or type(model).__name__, params, inner.hidden_size,
                           getattr(inner, "intermediate_size", 4 * inner.hidden_size), dtype_bytes)


@dataclass(frozen=True)
class TeacherSpec:
    """A frozen network a step runs besides the denoiser (REPA's DINO, the perceptual losses' VGG or DINO)."""

    name: str
    weights: int  # bytes
    forward: int  # bytes per image: the no-grad forward's working memory (estimate)
    saved: int = 0  # bytes per image kept for the backward when gradients flow through it (estimate)


def vit_teacher(name: str, shape, image_tokens: int, gradients: bool = False, dtype_bytes: int = 2) -> TeacherSpec:
    """A ViT teacher (transformers config or :func:`prx.teachers.teacher_shape`) on ``image_tokens`` patches; with
    ``gradients`` (the DINO perceptual loss) its activations are kept for the backward into x̂0."""
    d = shape.hidden_size
    mlp = getattr(shape, "intermediate_size", None) or int(d * shape.mlp_ratio)
    n = image_tokens + 1 + int(getattr(shape, "num_register_tokens", 0) or 0)
    params = shape.num_hidden_layers * (4 * d * d + 2 * d * mlp) + 3 * shape.patch_size**2 * d
    forward = n * (4 * d + 2 * mlp) * dtype_bytes
    saved = shape.num_hidden_layers * n * (10 * d + 2 * mlp) * dtype_bytes if gradients else 0
    return TeacherSpec(name, params * dtype_bytes, forward, saved)


def lpips_vgg_teacher(height: int, width: int, dtype_bytes: int = 2) -> TeacherSpec:
    """LPIPS-VGG16 on one image pair of height × width (after its resize): the prediction's conv activations are
    kept for the backward, the target's are not."""
    from prx.lpips import VGG16_LAYOUT

    saved, peak, channels, h, w = 0, 0, 3, height, width
    for v in VGG16_LAYOUT:
        if v == "M":
            h, w = h // 2, w // 2
        else:
            saved += 2 * v * h * w  # conv output and its ReLU
            peak = max(peak, 2 * (channels + v) * h * w)
            channels = v
    return TeacherSpec("LPIPS-VGG16", 14_716_171 * dtype_bytes, peak * dtype_bytes, saved * dtype_bytes)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    micro_batch: int
    checkpointing: bool
    text: str  # "gpu": the encoder on the GPU | "precomputed": embeddings read with the data
    sharding: str  # "none" | "ddp" | "fsdp2"
    cpu_offload: bool


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """A step's peak memory per rank, by part, for the chosen settings; what does not fit and what would."""

    title: str
    gpu_memory: int
    gpus: int
    batch_size: int
    choice: Choice | None
    components: list[Component] = field(default_factory=list)
    peak: int = 0
    host_memory: int = 0  # per rank, what CPU offload moves to the host
    reasons: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # when nothing fits: changes that would, smallest first
    without_checkpointing: int | None = None  # the peak at the same micro-batch without activation checkpointing
    phases: dict[str, int] = field(default_factory=dict)  # the step's phases' peaks; ``peak`` is the largest

    @property
    def fits(self) -> bool:
        return self.choice is not None and self.peak <= usable(self.gpu_memory)

    @property
    def accumulation(self) -> int:
        return max(1, self.batch_size // self.gpus // self.choice.micro_batch) if self.choice else 0

    def describe(self) -> str:
        lines = [self.title]
        if self.choice is None:
            lines.append(f"does not fit on {self.gpus} × {self.gpu_memory / GiB:.0f} GiB with any micro-batch, "
                         f"activation checkpointing, precomputed text, sharding or CPU offload")
        else:
            c = self.choice
            lines.append(
                f"choice: micro-batch {c.micro_batch} ({self.accumulation} accumulation step"
                f"{'s' if self.accumulation > 1 else ''} to batch {self.batch_size}), activation checkpointing "
                f"{'on' if c.checkpointing else 'off'}, text {'encoder on the GPU' if c.text == 'gpu' else 'precomputed embeddings'}, "
                f"{ {'none': 'one device', 'ddp': 'DDP', 'fsdp2': 'FSDP2 sharding'}[c.sharding]}"
                f"{', CPU offload' if c.cpu_offload else ''}")
            lines += ["", "| part | GiB | how |", "|---|---:|---|"]
            lines += [f"| {p.name} | {p.bytes / GiB:.2f} | {p.note} |" for p in self.components]
            lines.append(f"| = forward+backward | {self.phases['forward+backward'] / GiB:.2f} | the rows above |")
            for phase in ("encoders", "optimizer step"):
                lines.append(f"| {phase} phase | {self.phases[phase] / GiB:.2f} | "
                             + ("text encoder and teachers' forward before the denoiser's |" if phase == "encoders" else
                                "all gradients + the optimizer's temporaries (formula) |"))
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"| **peak per rank** | **{self.peak / GiB:.2f}** | {verdict} in {self.gpu_memory / GiB:.0f} GiB "
                         f"(usable {usable(self.gpu_memory) / GiB:.1f}: {FRAGMENTATION:.0%} kept for fragmentation, an estimate) |")
            if self.host_memory:
                lines.append(f"| host memory per rank (offloaded) | {self.host_memory / GiB:.2f} | CPUOffloadPolicy |")
            if self.without_checkpointing is not None:
                lines.append(f"without activation checkpointing the same micro-batch peaks at "
                             f"{self.without_checkpointing / GiB:.1f} GiB")
        lines += [f"- {r}" for r in self.reasons]
        if self.changes:
            lines.append("smallest change that fits: " + self.changes[0])
            lines += [f"  also: {c}" for c in self.changes[1:]]
        return "\n".join(lines)


def usable(gpu_memory: int) -> int:
    return int(gpu_memory * (1 - FRAGMENTATION))


@dataclass(frozen=True)
class Setup:
    """What is planned (the arguments of :func:`plan_memory`)."""

    model: object  # prx ModelConfig, text_dim set
    height: int
    width: int
    batch_size: int  # images per optimizer step, all ranks together
    gpu_memory: int
    gpus: int
    lora: object | None  # prx.lora.LoRAConfig, or None: every weight trains
    optimizer: str
    precision: str  # bf16 | fp32
    ema: bool
    text_encoder: TextEncoderSpec | None
    text_tokens: int
    text_cache: int  # bytes of caption encodings the encoder's run keeps on the GPU (text.cache_gib)
    teachers: tuple[TeacherSpec, ...]
    cuda_graphs: bool


def plan_memory(model_cfg, *, resolution: int | tuple[int, int], batch_size: int, gpu_memory: float | int,
                gpus: int = 1, lora=None, optimizer: str = "adamw", precision: str = "bf16", ema: bool = True,
                text_encoder: TextEncoderSpec | None = None, text_tokens: int = 256, text_cache_gib: float = 2.0,
                teachers: tuple[TeacherSpec, ...] = (), cuda_graphs: bool = False, micro_batch: int | None = None,
                checkpointing: bool | None = None, text: str | None = None, sharding: str | None = None,
                cpu_offload: bool | None = None) -> Plan:
    """Plan a training step's memory per rank on ``gpus`` GPUs of ``gpu_memory`` bytes (or GiB, if < 4096).

    Settings left None are chosen: the first that fits of (no CPU offload, then offload) × (no activation
    checkpointing, then checkpointing) × (text encoder on the GPU, then precomputed embeddings) × (DDP / one device,
    then FSDP2 for a LoRA run; FSDP2 for a full run on several GPUs), each with the largest micro-batch (a power of
    two dividing the per-rank batch) that fits. ``lora`` None plans a full fine-tune.
    """
    if gpu_memory < 4096:
        gpu_memory = int(gpu_memory * GiB)
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if model_cfg.text_dim is None:
        raise ConfigError("plan_memory: the model config needs text_dim (the text encoder's width)")
    if batch_size % gpus:
        raise ConfigError(f"batch {batch_size} does not split over {gpus} GPUs: use a multiple of {gpus}")
    if optimizer not in ("adamw", "muon") or precision not in ("bf16", "fp32"):
        raise ConfigError(f"plan_memory: optimizer must be adamw or muon and precision bf16 or fp32, got "
                          f"{optimizer}, {precision}")
    setup = Setup(model_cfg, h, w, batch_size, int(gpu_memory), gpus, lora, optimizer, precision, ema, text_encoder,
                  text_tokens, int(text_cache_gib * GiB) if text_encoder is not None else 0, tuple(teachers),
                  cuda_graphs)
    counts = count_params(model_cfg, lora)
    best = _search(setup, counts, micro_batch, checkpointing, text, sharding, cpu_offload)
    plan = best if best is not None else Plan(_title(setup, counts), setup.gpu_memory, gpus, batch_size, None)
    if not plan.fits:
        plan.changes = _changes(setup, counts)
    return plan


def _title(s: Setup, counts: ParamCounts) -> str:
    m = s.model
    mode = (f"LoRA rank {s.lora.rank} ({_count(counts.trained)} trained)" if s.lora is not None
            else f"full fine-tune ({_count(counts.trained)} trained)")
    return (f"PRX {_count(counts.total)} ({m.num_layers} blocks, hidden {m.hidden_dim}, patch {m.patch_size}), "
            f"{mode}, {s.optimizer}, {s.precision}; {s.height}×{s.width} px, batch {s.batch_size}; "
            f"{s.gpus} × {s.gpu_memory / GiB:.0f} GiB")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _micro_batches(per_rank: int) -> list[int]:
    """Powers of two dividing the per-rank batch, largest first (then the batch itself if it is not one)."""
    out = [per_rank] if per_rank & (per_rank - 1) else []
    out += [2**k for k in range(int(math.log2(per_rank)), -1, -1) if per_rank % 2**k == 0]
    return out


def _search(s: Setup, counts, micro_batch, checkpointing, text, sharding, cpu_offload) -> Plan | None:
    """The first setting, in the order of :func:`plan_memory`, that fits with its largest micro-batch (the peak grows
    with the micro-batch, so they are tried from 1 up until one does not fit); else the plan closest to fitting."""
    per_rank = s.batch_size // s.gpus
    shardings = [sharding] if sharding else (["none"] if s.gpus == 1 else
                                             (["ddp", "fsdp2"] if s.lora is not None else ["fsdp2"]))
    texts = [text] if text else (["gpu", "precomputed"] if s.text_encoder is not None else ["precomputed"])
    offloads = [cpu_offload] if cpu_offload is not None else [False, True]
    checkpoints = [checkpointing] if checkpointing is not None else [False, True]
    sizes = [micro_batch] if micro_batch else _micro_batches(per_rank)[::-1]
    closest = None
    for offload in offloads:
        for ac in checkpoints:
            for where in texts:
                for mode in (["fsdp2"] if offload else shardings):  # CPUOffloadPolicy is FSDP2's, one GPU too
                    fitting = None
                    for mb in sizes:
                        plan = evaluate(s, counts, Choice(mb, ac, where, mode, offload))
                        if not plan.fits:
                            if closest is None or plan.peak < closest.peak:
                                closest = plan
                            break
                        fitting = plan
                    if fitting is not None:
                        return fitting
    return closest


def evaluate(s: Setup, counts: ParamCounts, c: Choice) -> Plan:
    """The peak per rank of one choice of settings, by part. The table's rows are the forward+backward phase (they
    add up to it); the encoders (before the forward) and the optimizer step are the other phases, and the peak is
    the largest of the three."""
    per_rank = s.batch_size // s.gpus
    steps = max(1, per_rank // c.micro_batch)
    autocast = torch.bfloat16 if s.precision == "bf16" else None
    fsdp = c.sharding == "fsdp2"
    trace = trace_step(s.model, lora=s.lora, height=s.height, width=s.width, micro_batch=c.micro_batch,
                       text_tokens=s.text_tokens, micro_batches=min(steps, 2), checkpointing=c.checkpointing,
                       autocast=autocast, weights="compute" if fsdp else "master")
    compute = 2 if autocast is not None else 4
    grads = counts.trained * 4  # fp32, like the trained weights
    states = (counts.trained * 8 if s.optimizer == "adamw"
              else counts.trained_2d * 4 + (counts.trained - counts.trained_2d) * 8)
    ema = counts.trained * 4 if s.ema else 0
    opt_temp = _optimizer_temporaries(s, counts)
    resident: list[Component] = []  # alive through the whole step
    step: list[Component] = []  # the forward+backward's own memory at its peak
    host = 0
    if fsdp:
        world = s.gpus
        frozen = (counts.total - counts.trained) * (2 if s.lora is not None and s.lora.base_dtype == "bfloat16" else 4)
        sharded = [Component("weights (sharded)", (frozen + counts.trained * 4) // world,
                             f"exact count ÷ {world}; fp32 masters" + (", frozen base bf16" if frozen else "")),
                   Component("gradients (sharded)", grads // world, f"fp32 ÷ {world}"),
                   Component("optimizer states (sharded)", states // world, _states_note(s.optimizer, world)),
                   Component("EMA (sharded)", ema // world, "fp32 copy of the trained weights" if s.ema else "off")]
        if c.cpu_offload:
            host = sum(p.bytes for p in sharded)
            resident.append(Component("weights, gradients, optimizer, EMA", 0,
                                      f"on the host: {host / GiB:.1f} GiB per rank (CPUOffloadPolicy)"))
        else:
            resident += sharded
        step.append(Component("gathered blocks", 2 * counts.largest_block * compute + counts.outside_blocks * compute,
                              "2 blocks + the root unit in the compute dtype (FSDP2 all-gather, prefetch)"))
        if counts.trained > counts.largest_block:
            step.append(Component("one block's full gradients", counts.largest_block * 4, "fp32, before reduce-scatter"))
        if steps > 1:
            step.append(Component("unsynced accumulated gradients", grads, f"fp32, unsharded: FSDP2 accumulates "
                                  f"{steps} micro-batches without reduce-scatter"))
        optimizer_extra = opt_temp // world
    else:
        resident.append(Component("weights", trace.params, "exact count; " + (
            f"frozen base {s.lora.base_dtype}, adapters fp32" if s.lora is not None else "fp32 masters")))
        resident.append(Component("optimizer states", states, _states_note(s.optimizer, 1)))
        resident.append(Component("EMA", ema, "fp32 copy of the trained weights" if s.ema else "off"))
        if c.sharding == "ddp":
            resident.append(Component("DDP gradient buckets", grads, "a second copy of the gradients"))
        step.append(Component("gradients", trace.grads_at_peak if steps == 1 else grads,
                              "fp32, those alive at the peak" if steps == 1 else "fp32, all (accumulating)"))
        optimizer_extra = grads + opt_temp
    step.append(Component("activations + backward temporaries", trace.activations,
                          f"traced: micro-batch {c.micro_batch}{' × 2 accumulated' if steps > 1 else ''}, "
                          f"checkpointing {'on' if c.checkpointing else 'off'}"
                          f"{', bf16 autocast' if autocast is not None else ''}"
                          + ("" if fsdp or s.lora is not None or autocast is None else
                             ", incl. autocast's bf16 copies of the fp32 weights")))
    text_parts, text_transient = _text_parts(s, c)
    teacher_parts, teacher_transient, teacher_saved = _teacher_parts(s, c)
    resident += text_parts + teacher_parts
    if teacher_saved:
        step.append(Component("teacher activations kept for backward", teacher_saved, "estimate (perceptual losses)"))
    if s.cuda_graphs:
        resident.append(Component("CUDA-graph pools", _graph_pools(s, c, trace),
                                  "estimate: one block's and the teachers' working memory, kept by the graphs' pools"))
    resident.append(Component("CUDA context, workspaces" + (", NCCL" if s.gpus > 1 else ""),
                              CUDA_CONTEXT + (NCCL_BUFFERS if s.gpus > 1 else 0), "estimate"))
    base = sum(p.bytes for p in resident)
    phases = {"forward+backward": base + sum(p.bytes for p in step),
              "encoders": base + text_transient + teacher_transient,
              "optimizer step": base + optimizer_extra}
    plan = Plan(_title(s, counts), s.gpu_memory, s.gpus, s.batch_size, c, resident + step, max(phases.values()), host,
                phases=phases)
    plan.reasons = _reasons(s, c, plan)
    if c.checkpointing:
        plain = trace_step(s.model, lora=s.lora, height=s.height, width=s.width, micro_batch=c.micro_batch,
                           text_tokens=s.text_tokens, micro_batches=min(steps, 2), checkpointing=False,
                           autocast=autocast, weights="compute" if fsdp else "master")
        plan.without_checkpointing = phases["forward+backward"] - trace.activations + plain.activations
    return plan


def _states_note(optimizer: str, world: int) -> str:
    what = "AdamW: 2 fp32 per trained weight" if optimizer == "adamw" else "Muon: 1 fp32 per 2D matrix weight, Adam 2"
    return what + (f", ÷ {world}" if world > 1 else "")


def _optimizer_temporaries(s: Setup, counts: ParamCounts) -> int:
    """Formula: torch's multi-tensor AdamW makes one fp32 temporary the size of all its parameters (sqrt of the
    second moments); prx's Muon stacks same-shape matrices: ~3 fp32 copies of the largest stack."""
    if s.optimizer == "adamw":
        return counts.trained * 4
    return 3 * counts.largest_same_shape * 4 + (counts.trained - counts.trained_2d) * 4


def _text_parts(s: Setup, c: Choice) -> tuple[list[Component], int]:
    if s.text_encoder is None or c.text == "precomputed":
        embeds = c.micro_batch * s.text_tokens * s.model.text_dim * 4
        note = "the batch's embeddings, fp32"
        if s.text_encoder is not None:
            note += f" (the encoder, {s.text_encoder.weights / GiB:.1f} GiB, stays off the GPU)"
        return [Component("text: precomputed embeddings", embeds, note)], 0
    e = s.text_encoder
    return [Component(f"text encoder ({e.name})", e.weights, f"exact count, {e.dtype_bytes}-byte weights"),
            Component("caption cache", s.text_cache, "text.cache_gib, on the GPU (its bound)")], \
        e.forward(c.micro_batch, s.text_tokens)


def _teacher_parts(s: Setup, c: Choice) -> tuple[list[Component], int, int]:
    parts = [Component(f"teacher {t.name}", t.weights, "weights; forward and kept activations: estimates")
             for t in s.teachers]
    transient = max((t.forward * c.micro_batch for t in s.teachers), default=0)
    saved = sum(t.saved * c.micro_batch for t in s.teachers)
    return parts, transient, saved


def _graph_pools(s: Setup, c: Choice, trace: StepTrace) -> int:
    """Estimate: a CUDA graph's pool holds its graph's temporaries for good (prx captures the compiled blocks on one
    GPU, and the teachers): about one block's share of the step's activations, plus the teachers' forward."""
    per_block = trace.activations // max(1, s.model.num_layers)
    return per_block + sum(t.forward * c.micro_batch for t in s.teachers)


def _reasons(s: Setup, c: Choice, plan: Plan) -> list[str]:
    reasons = []
    if c.checkpointing:
        reasons.append("activation checkpointing: without it even this micro-batch does not fit")
    if c.text == "precomputed" and s.text_encoder is not None:
        reasons.append(f"precomputed text embeddings: the encoder's {s.text_encoder.weights / GiB:.1f} GiB does not "
                       f"fit beside the step (write them once with the data; prx's shards hold them)")
    if c.sharding == "fsdp2":
        reasons.append("FSDP2: weights, gradients, optimizer states and EMA sharded over the ranks")
    if c.cpu_offload:
        reasons.append("CPU offload: even sharded, the states do not fit on the GPU; the host holds them "
                       "(much slower steps)")
    if plan.accumulation > 1:
        reasons.append(f"micro-batch {c.micro_batch}: a larger one does not fit; gradients accumulate over "
                       f"{plan.accumulation} micro-batches")
    return reasons


def _changes(s: Setup, counts: ParamCounts) -> list[str]:
    """What would fit, smallest change first: more GPUs (sharded), LoRA, a lower resolution, more memory."""
    from prx.lora import LoRAConfig

    out = []
    if s.lora is None:
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus > s.gpus and s.batch_size % gpus == 0:
                more = _search(replace(s, gpus=gpus), counts, None, None, None, "fsdp2", False)
                if more is not None and more.fits:
                    out.append(f"{gpus} GPUs with FSDP2 (peak {more.peak / GiB:.1f} GiB per rank)")
                    break
        lora = LoRAConfig(rank=16)
        with_lora = _search(replace(s, lora=lora), count_params(s.model, lora), None, None, None, None, None)
        if with_lora is not None and with_lora.fits:
            out.append(f"LoRA (rank 16) instead of every weight (peak {with_lora.peak / GiB:.1f} GiB)")
    if max(s.height, s.width) > 512:
        scale = 512 / max(s.height, s.width)
        p = s.model.patch_size
        lower = replace(s, height=max(p, int(s.height * scale) // p * p), width=max(p, int(s.width * scale) // p * p))
        plan = _search(lower, counts, None, None, None, None, None)
        if plan is not None and plan.fits:
            out.append(f"{lower.height}×{lower.width} px (peak {plan.peak / GiB:.1f} GiB)")
    least = _search(replace(s, gpu_memory=10**15), counts, 1, True, "precomputed", None, None)
    if least is not None:
        needed = least.peak / (1 - FRAGMENTATION)
        out.append(f"a GPU with at least {math.ceil(needed / GiB)} GiB (micro-batch 1, checkpointing, precomputed "
                   f"text{', FSDP2' if least.choice.sharding == 'fsdp2' else ''})")
    return out


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
    import prx.model
    from prx.lora import add_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = prx.model.build_model(model_cfg)
        if lora is not None:
            add_lora(model, lora, base_dtype=getattr(torch, lora.base_dtype) if autocast is not None else None)
    model.activation_checkpointing = checkpointing
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
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
