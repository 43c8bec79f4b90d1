"""``prx bench``: throughput, a step-time breakdown, peak memory and MFU of a config's training step.

The steps are the trainer's own (same data path, losses, optimizer, EMA), timed phase by phase
with device synchronisation. MFU divides the FLOPs a step really does — the denoiser with its
routing, every teacher forward, the backward through the perceptual networks, Muon's
Newton–Schulz — by the step time and the device's peak: the spec sheet's dense bf16 number for
known GPUs (or ``--peak-tflops``), and on a CPU the rate a large matmul reaches in the step's
precision, measured first (so a CPU MFU says how close to the machine's own matmul speed a step
runs).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from prx.config import Config
from prx.execution import apply_recompile_limit, block_shapes, recompile_limit
from prx.flops import fmt_flops, step_flops
from prx.train import Trainer

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' spec sheets, in TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                   "A100": 312.0, "L40S": 362.0, "B200": 2250.0, "GH200": 989.0}


DEVICE_READ = "device read"  # the trainer's phase around the step's one sync (the losses read back)
PROFILED_STEPS = 5  # at most, after the timed steps, with --profile


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CPU's work is done when its call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet(config: Config) -> Config:
    """The config without samples, logs, progress bar or background checkpoint writes, for measuring."""
    return replace(config, train=replace(config.train, async_checkpoint=False),
                   logging=replace(config.logging, sample_every=0, tensorboard=False, progress_bar=False))


class PhaseTimer:
    """Wall-clock per phase of the step, synchronising the GPU around each one; on a GPU also the phase's host
    time, until its last call returns and before the closing sync (what the host spends launching it: a phase
    whose host time is close to its whole time keeps the GPU waiting).

    Disabled, it still times the step's one device read (:data:`DEVICE_READ`) when ``count_waits``: without
    syncs, that is how long the host waits for the device each step, and the rest of the step is host work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.host_seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        self.count_waits = False
        self.wait_seconds = 0.0

    def sync(self) -> None:
        sync(self.device)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            start = time.perf_counter()
            try:
                yield
            finally:
                if self.count_waits and phase == DEVICE_READ:
                    self.wait_seconds += time.perf_counter() - start
            return
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.host_seconds[phase] += time.perf_counter() - start
            self.sync()
            self.seconds[phase] += time.perf_counter() - start


def device_peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, "given with --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key.replace(" ", "").lower() in name.replace(" ", "").lower():
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (spec sheet)"
        return float("nan"), f"{name}: unknown peak, pass --peak-tflops"
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    rate = reps * 2 * n**3 / (time.perf_counter() - start)
    return rate, f"CPU {str(dtype).replace('torch.', '')} matmul measured at {rate / 1e9:.0f} GFLOP/s"


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU memory allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


def run_bench(config: Config, steps: int = 5, warmup: int = 2, peak_tflops: float | None = None, log=print,
              warm_text: bool = True, separate_phase_pass: bool | None = None, profile: str | None = None) -> dict:
    config = quiet(config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, tmp, log=lambda *a, **k: None)
        trainer.setup()
        timer = PhaseTimer(trainer.device)
        trainer.timer = timer
        stage_index, stage = config.stage_at(0)
        # On a GPU a sync around each phase drains the launch queue, which training does not do, so the step
        # time comes from steps with no phase timer and the breakdown from as many more, timed phase by phase.
        # (On a CPU the work is synchronous: one pass gives both.)
        if separate_phase_pass is None:
            separate_phase_pass = trainer.device.type == "cuda"
        timed = [(False, range(warmup, warmup + steps)), (True, range(warmup + steps, warmup + 2 * steps))]
        if not separate_phase_pass:
            timed = [(True, range(warmup, warmup + steps))]
        last = timed[-1][1].stop
        # a few steps: the profiler's own bookkeeping of thousands of kernels a step takes longer than they do
        profiled = range(last, last + min(steps, PROFILED_STEPS)) if profile else range(0)
        text = _warm_captions(trainer, warm_text, range(warmup, max(last, profiled.stop)))
        for step in range(warmup):  # compile, allocator, caches
            trainer.train_step(step)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        pass_seconds, pass_results = [], []
        for phased, step_range in timed:
            timer.enabled, timer.count_waits = phased, not phased
            timer.sync()
            start = time.perf_counter()
            pass_results.append([trainer.train_step(step) for step in step_range])
            timer.sync()
            pass_seconds.append((time.perf_counter() - start) / steps)
        (seconds, results), phased_seconds = (pass_seconds[0], pass_results[0]), pass_seconds[-1]
        sizes = [r.image_size for r in results]
        profiled_steps = profile_steps(trainer, profiled, profile) if profile else None
        world = trainer.dist.world
        per_rank = stage.batch_size // world
        # FLOPs and tokens of the batches actually run: buckets of real photos are not square, captions are padded
        # to the batch's length and on a CPU only their real tokens are projected
        per_size = [step_flops(config, stage, batch=per_rank, size=r.image_size, text_tokens=r.text_length or None,
                               projected_text_tokens=r.text_tokens or None) for r in results]
        flops = {k: sum(f[k] for f in per_size) / steps for k in per_size[0]}
        peak, peak_source = device_peak_flops(trainer.device, trainer.plan.autocast or torch.float32, peak_tflops)
        memory, memory_kind = peak_memory_gib(trainer.device)
        p = config.model.patch_size
        tokens = sum((h // p) * (w // p) for h, w in sizes) / steps
        phases = {k: v / steps for k, v in timer.seconds.items()}
        phases["other"] = max(0.0, phased_seconds - sum(phases.values()))
        host_phases = {k: v / steps for k, v in timer.host_seconds.items()}
        result = {
            "config": config.name, "device": str(trainer.device), "world": world, "resolution": stage.resolution,
            "batch_per_device": per_rank, "micro_batch": config.train.micro_batch_size or per_rank,
            "precision": trainer.plan.precision, "execution": trainer.plan.to_dict(),
            "compile": config.train.compile, "cuda_graphs": trainer.plan.cuda_graphs,
            "tread": config.tricks(stage).tread,
            "text": text,
            "step_seconds": seconds, "images_per_s": per_rank / seconds, "tokens_per_s": per_rank * tokens / seconds,
            "phases": phases, "phased_step_seconds": phased_seconds, "flops_per_step": flops,
            "achieved_tflops": sum(flops.values()) / seconds / 1e12,
            "mfu": sum(flops.values()) / seconds / peak, "peak": peak_source, "peak_memory_gib": memory,
            "memory_kind": memory_kind,
            # the timed steps' losses and gradient norms, step by step: variants run the same steps from the same
            # seeds, so theirs must agree up to bf16 rounding (benchmarks/gpu_summary.py compares them)
            "losses": [r.loss for results in pass_results for r in results],
            "grad_norms": [r.grad_norm for results in pass_results for r in results],
        }
        if trainer.device.type == "cuda":
            # each phase's host time (launches, Python, host tensors) without its wait for the device; and in the
            # steps without phase timers, how long the host waited for the device at the step's one read
            result.update(host_phases=host_phases, host_wait_seconds=timer.wait_seconds / steps)
        if profiled_steps:
            result["profile"] = profiled_steps
    return result


def _warm_captions(trainer, warm: bool, steps: range) -> str:
    """How the timed steps get their captions' encodings: precomputed by the data (``prx data embed``), cached now
    for a source whose batches are a function of the step (as a long run's cache serves them), or encoded in the
    step. Returns which."""
    if trainer.data.empty_embedding is not None:
        return "precomputed"
    if not warm or trainer.data.state_dict():
        return "encoded in the step"
    for step in steps:
        batch = trainer.data.batch(step, *trainer.config.stage_at(step))
        if batch.text is None:
            trainer.text_encoder.encode(batch.captions + [""])
    return "cached"


def profile_steps(trainer, steps: range, path: str) -> dict:
    """``steps`` more steps under ``torch.profiler``, no syncs but at the ends (each phase marked with
    ``record_function``): writes the tables of the ops by device time and by host time to ``path`` and
    returns per step the wall time under the profiler, the time the device was busy running kernels,
    and the kernel launches the host made (a step whose device is idle part of the time is bound by
    the host: its launches, syncs or Python)."""
    device = trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    marks = set()  # the phases' names, and torch's "Optimizer.step#..." marks

    def mark(phase):
        marks.add(phase)
        return record_function(phase)

    trainer.timer = mark
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for step in steps:
            trainer.train_step(step)
        sync(device)
    wall = (time.perf_counter() - start) / len(steps)
    events = prof.events()
    # the union of the kernels' and copies' intervals (the phases' marks show on the device's timeline too)
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and e.name not in marks
                   and not e.name.startswith("Optimizer.") and e.time_range.end > e.time_range.start)
    busy, reach = 0.0, float("-inf")
    for begin, end in spans:
        busy += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    busy = busy / 1e6 / len(steps)
    launches = sum(1 for e in events if e.name.startswith(("cudaLaunch", "cuLaunch"))) / len(steps)
    waits = sum(1 for e in events if e.name.endswith("Synchronize")) / len(steps)  # the host waiting for the device
    table = prof.key_averages()
    sections = [f"{len(steps)} steps profiled: {wall:.4f} s/step under the profiler"
                + (f", device busy {busy:.4f} s/step ({busy / wall:.0%}), {launches:.0f} kernel launches/step, "
                   f"{waits:.0f} host waits (…Synchronize)/step"
                   if device.type == "cuda" else "")]
    if device.type == "cuda":
        sections.append("by device time:\n" + table.table(sort_by="self_device_time_total", row_limit=40,
                                                          max_name_column_width=60))
    sections.append("by host time:\n" + table.table(sort_by="self_cpu_time_total", row_limit=40,
                                                    max_name_column_width=60))
    Path(path).write_text("\n\n".join(sections) + "\n")
    result = {"seconds_per_step": wall, "file": str(path)}
    if device.type == "cuda":
        result.update(device_busy_seconds_per_step=busy, device_busy_fraction=busy / wall, launches_per_step=launches,
                      host_waits_per_step=waits)
    return result


def largest_micro_batch(config: Config, candidates: list[int], log=print) -> dict:
    """The largest of ``candidates`` whose training step runs without running out of device memory.

    One trainer, built once with the config's first stage; each candidate (largest first) sets
    ``train.micro_batch_size`` and runs two steps of a batch of the largest candidate (the first
    compiles; with CUDA graphs three, the second records them). Reports each candidate's outcome, peak memory
    and the step time of the one that fits.
    """
    candidates = sorted(set(candidates), reverse=True)
    steps = 3 * len(candidates)  # all in the first stage, with a batch of the largest candidate
    stage = replace(config.stages[0], batch_size=candidates[0], steps=max(steps, config.stages[0].steps))
    config = quiet(replace(config, train=replace(config.train, stages=[stage])))
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, tmp, log=lambda *a, **k: None)
        trainer.setup()
        device, step = trainer.device, 0
        # each candidate's micro-batch compiles the blocks for shapes of its own: room for them all, as a run has
        shapes = {(micro, tokens, routed) for micro in candidates
                  for _, tokens, routed in block_shapes(config, trainer.data.sizes, trainer.dist.world,
                                                        trainer.router.num_kept if trainer.router else None)}
        trainer.plan = replace(trainer.plan, recompile_limit=recompile_limit(shapes, 0))
        apply_recompile_limit(trainer.plan)
        for micro in candidates:
            trainer.micro_batch_size = micro
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            outcome: dict = {"micro_batch": micro}
            # CUDA graphs record in a compiled function's second call and replay from its third
            warmup = 2 if trainer.plan.any_graphs else 1
            try:
                for _ in range(warmup):  # compiles for the new shape
                    trainer.train_step(step)
                    step += 1
                sync(device)
                start = time.perf_counter()
                trainer.train_step(step)
                sync(device)
                outcome.update(fits=True, step_seconds=time.perf_counter() - start)
            except torch.OutOfMemoryError:
                outcome["fits"] = False
            step += 1
            # after the except block, so the failed step's tensors (held by the traceback) are gone
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            outcome["peak_memory_gib"] = peak_memory_gib(device)[0]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                outcome["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
            tried.append(outcome)
            log(f"micro-batch {micro}: " + (f"fits, peak {outcome['peak_memory_gib']:.1f} GiB, "
                                             f"{outcome['step_seconds']:.3f} s per step of "
                                             f"{config.stages[0].batch_size}"
                                             if outcome["fits"] else "out of memory"))
            if outcome["fits"]:
                break
        trainer.close()
    fitting = [t["micro_batch"] for t in tried if t["fits"]]
    return {"config": config.name, "resolution": config.stages[0].resolution, "largest_micro_batch":
            fitting[0] if fitting else None, "tried": tried}


def format_bench(r: dict) -> str:
    ranks = f" × {r['world']} ranks" if r["world"] > 1 else ""
    lines = [
        f"{r['config']}: {r['resolution']} px, batch {r['batch_per_device']} per device (micro {r['micro_batch']}), "
        f"{r['precision']}, {r['device']}{ranks}, TREAD {'on' if r['tread'] else 'off'}, compile {r['compile']}"
        f"{', CUDA graphs' if r.get('cuda_graphs') else ''}, "
        f"captions {r.get('text', 'encoded in the step')}",
        f"  {r['step_seconds']:.3f} s/step | {r['images_per_s']:.2f} images/s | {r['tokens_per_s']:.0f} image tokens/s "
        f"per device | peak {r['memory_kind']} {r['peak_memory_gib']:.2f} GiB",
        *([f"  the host waited {r['host_wait_seconds'] * 1e3:.1f} ms of each step for the device (its one read): "
           f"the host works {(r['step_seconds'] - r['host_wait_seconds']) * 1e3:.1f} ms a step"]
          if "host_wait_seconds" in r else []),
        "  step time by phase"
        + (f" (more steps, with a sync around each phase: {r['phased_step_seconds']:.3f} s/step)"
           if abs(r.get("phased_step_seconds", r["step_seconds"]) - r["step_seconds"]) > 1e-9 else "")
        + ":",
    ]
    phased = r.get("phased_step_seconds", r["step_seconds"])
    host = r.get("host_phases")
    for name, seconds in sorted(r["phases"].items(), key=lambda kv: -kv[1]):
        launched = f"   host {host[name] * 1e3:6.1f} ms" if host and name in host else ""
        lines.append(f"    {name:<38} {seconds:8.3f} s  {seconds / phased:6.1%}{launched}")
    total = sum(r["flops_per_step"].values())
    parts = ", ".join(f"{k} {fmt_flops(v)}" for k, v in r["flops_per_step"].items())
    lines.append(f"  FLOPs per step: {fmt_flops(total)} ({parts}) → {fmt_flops(r['achieved_tflops'] * 1e12)}/s")
    lines.append(f"  MFU {r['mfu']:.1%} of {r['peak']}")
    if p := r.get("profile"):
        busy = (f": the device ran kernels {p['device_busy_fraction']:.0%} of the time, {p['launches_per_step']:.0f} "
                f"launches per step" if "device_busy_fraction" in p else "")
        lines.append(f"  profile ({p['seconds_per_step']:.3f} s/step under the profiler){busy}: {p['file']}")
    return "\n".join(lines)
