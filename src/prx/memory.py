"""Peak memory per rank of a training step, planned without allocating the model: which micro-batch, activation
checkpointing, text encoder placement, FSDP2 sharding and CPU offload a fine-tune (or a run) needs on a GPU.

How each part is found:

- **The denoiser's step is traced, not modelled** (:mod:`prx.memory_trace`): the real prx model, with its adapters,
  in the trainer's dtypes, runs one step on fake tensors and every live byte is counted; a deep model is traced at
  4 and 5 blocks and extrapolated exactly. Seconds for a 7B model on a laptop, no GPU.
- **Counted exactly on the meta device**: parameters (frozen, trained), per block, per shape.
- **Formulas**: optimizer states (AdamW 2 fp32 per trained parameter; Muon 1 for 2D matrices), the EMA copy, FSDP2's
  sharding (÷ world size, plus two blocks' gathered weights and one block's full gradients in flight, plus the
  unsharded fp32 gradients FSDP2 accumulates without syncing when micro-batches accumulate), DDP's gradient
  buckets, the optimizer step's temporaries, CPU offload (sharded weights, gradients and states on the host).
- **Estimates, labelled as such**: the text encoder's and teachers' forward working memory, CUDA-graph pools, the
  CUDA context and workspaces, and a reserve for the caching allocator's fragmentation.

:func:`plan_memory` returns a :class:`Plan` (``describe()`` prints its table); the plan of one device is checked
against the CPU allocator's own count of a real step (``benchmarks/finetune_memory.py``, ``tests/test_memory.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from prx.config.model import LoRAConfig
from prx.errors import ConfigError
from prx.lpips import VGG16_LAYOUT
from prx.memory_trace import ParamCounts, StepTrace, count_params, trace_step

GiB = 1024**3
CUDA_CONTEXT = int(0.8 * GiB)  # estimate: CUDA context, cuBLAS/cuDNN workspaces, kernels (not torch's allocator)
NCCL_BUFFERS = int(0.5 * GiB)  # estimate: NCCL's communication buffers when several ranks train
FRAGMENTATION = 0.05  # estimate: the caching allocator's reserve beyond what is allocated, share of the GPU


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
                f"{'on' if c.checkpointing else 'off'}, "
                f"text {'encoder on the GPU' if c.text == 'gpu' else 'precomputed embeddings'}, "
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
            lines.append(f"| **peak per rank** | **{self.peak / GiB:.2f}** | {verdict} in {self.gpu_memory / GiB:.0f} "
                         f"GiB (usable {usable(self.gpu_memory) / GiB:.1f}: {FRAGMENTATION:.0%} kept for "
                         f"fragmentation, an estimate) |")
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
    steps = max(1, s.batch_size // s.gpus // c.micro_batch)
    trace = _trace_of(s, c, c.checkpointing)
    if c.sharding == "fsdp2":
        resident, step, optimizer_extra, host = _sharded_parts(s, counts, c, steps)
    else:
        resident, step, optimizer_extra, host = _unsharded_parts(s, counts, c, steps, trace)
    step.append(Component("activations + backward temporaries", trace.activations,
                          f"traced: micro-batch {c.micro_batch}{' × 2 accumulated' if steps > 1 else ''}, "
                          f"checkpointing {'on' if c.checkpointing else 'off'}"
                          f"{', bf16 autocast' if s.precision == 'bf16' else ''}"
                          + ("" if c.sharding == "fsdp2" or s.lora is not None or s.precision != "bf16" else
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
        plan.without_checkpointing = (phases["forward+backward"] - trace.activations
                                      + _trace_of(s, c, False).activations)
    return plan


def _trace_of(s: Setup, c: Choice, checkpointing: bool) -> StepTrace:
    """The traced step of a choice: FSDP2 computes on gathered weights in the compute dtype."""
    steps = max(1, s.batch_size // s.gpus // c.micro_batch)
    return trace_step(s.model, lora=s.lora, height=s.height, width=s.width, micro_batch=c.micro_batch,
                      text_tokens=s.text_tokens, micro_batches=min(steps, 2), checkpointing=checkpointing,
                      autocast=torch.bfloat16 if s.precision == "bf16" else None,
                      weights="compute" if c.sharding == "fsdp2" else "master")


def _state_bytes(s: Setup, counts: ParamCounts) -> tuple[int, int, int]:
    """(gradients, optimizer states, EMA) in bytes, all fp32 like the trained weights."""
    states = (counts.trained * 8 if s.optimizer == "adamw"
              else counts.trained_2d * 4 + (counts.trained - counts.trained_2d) * 8)
    return counts.trained * 4, states, counts.trained * 4 if s.ema else 0


def _sharded_parts(s: Setup, counts: ParamCounts, c: Choice, steps: int):
    """FSDP2: (resident parts, forward+backward parts, optimizer-step extra, host bytes)."""
    world, compute = s.gpus, (2 if s.precision == "bf16" else 4)
    grads, states, ema = _state_bytes(s, counts)
    frozen = (counts.total - counts.trained) * (2 if s.lora is not None and s.lora.base_dtype == "bfloat16" else 4)
    sharded = [Component("weights (sharded)", (frozen + counts.trained * 4) // world,
                         f"exact count ÷ {world}; fp32 masters" + (", frozen base bf16" if frozen else "")),
               Component("gradients (sharded)", grads // world, f"fp32 ÷ {world}"),
               Component("optimizer states (sharded)", states // world, _states_note(s.optimizer, world)),
               Component("EMA (sharded)", ema // world, "fp32 copy of the trained weights" if s.ema else "off")]
    host = sum(p.bytes for p in sharded) if c.cpu_offload else 0
    resident = ([Component("weights, gradients, optimizer, EMA", 0,
                           f"on the host: {host / GiB:.1f} GiB per rank (CPUOffloadPolicy)")]
                if c.cpu_offload else sharded)
    step = [Component("gathered blocks", 2 * counts.largest_block * compute + counts.outside_blocks * compute,
                      "2 blocks + the root unit in the compute dtype (FSDP2 all-gather, prefetch)")]
    if counts.trained > counts.largest_block:
        step.append(Component("one block's full gradients", counts.largest_block * 4, "fp32, before reduce-scatter"))
    if steps > 1:
        step.append(Component("unsynced accumulated gradients", grads, f"fp32, unsharded: FSDP2 accumulates "
                              f"{steps} micro-batches without reduce-scatter"))
    return resident, step, _optimizer_temporaries(s, counts) // world, host


def _unsharded_parts(s: Setup, counts: ParamCounts, c: Choice, steps: int, trace: StepTrace):
    """One device or DDP: (resident parts, forward+backward parts, optimizer-step extra, host bytes)."""
    grads, states, ema = _state_bytes(s, counts)
    resident = [Component("weights", trace.params, "exact count; " + (
                    f"frozen base {s.lora.base_dtype}, adapters fp32" if s.lora is not None else "fp32 masters")),
                Component("optimizer states", states, _states_note(s.optimizer, 1)),
                Component("EMA", ema, "fp32 copy of the trained weights" if s.ema else "off")]
    if c.sharding == "ddp":
        resident.append(Component("DDP gradient buckets", grads, "a second copy of the gradients"))
    step = [Component("gradients", trace.grads_at_peak if steps == 1 else grads,
                      "fp32, those alive at the peak" if steps == 1 else "fp32, all (accumulating)")]
    return resident, step, grads + _optimizer_temporaries(s, counts), 0


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
