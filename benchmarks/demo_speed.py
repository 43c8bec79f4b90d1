"""The demo's training step on this CPU, variant by variant, measured side by side in one run.

Every variant is the trainer's own step (``prx bench``'s timer) on the demo config, in a process of
its own (the C allocator's setting is per process: the first row keeps glibc's default, as the demo
had it); the variants run in turns, round after round, one computing while the others wait, so a busy
moment of the machine hits all of them alike, and the table gives each one's median step time and
its speed-up over the first row. Captions are encoded
before the timed steps for every variant except ``online text`` (what a run pays while its caption
cache fills), so the other rows measure the model's step.

    python benchmarks/demo_speed.py                      # all variants, 3 rounds of 8 steps
    python benchmarks/demo_speed.py --rounds 5 --steps 10

The AVX2-only CPU of a machine without AVX512-BF16, on a machine that has it: restrict MKL (torch's
fp32 matmuls), torch's own kernels, oneDNN and inductor's code generation to AVX2, with an inductor
cache of its own (the cache is not keyed on these variables: kernels compiled for one ISA would be
reused for the other and give NaNs)::

    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) \
        python benchmarks/demo_speed.py
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch

from prx.bench import PhaseTimer
from prx.config import load_config
from prx.device import fast_matmul_dtype
from prx.text import TextEncoder
from prx.train import Trainer

WIDE = ["model.hidden_dim=256", "model.num_heads=4"]  # the demo's model until it became 192 wide
VARIANTS = {  # name → config overrides on top of the demo (which itself trains with compile and precision: auto)
    # the demo's step when issue #11 measured it: 256 wide, fp32, eager, torch's attention kernel, AdamW's
    # per-parameter loop, the batch rendered in the step, an EMA averaged every step
    "as first measured (AdamW loop)": [*WIDE, "ema.decay=0.999", "ema.warmup=true", "train.precision=fp32",
                                       "train.compile=off", "train.attention=sdpa"],
    "baseline (fp32, eager)": [*WIDE, "train.precision=fp32", "train.compile=off", "train.attention=sdpa"],
    "online text encoding": [*WIDE, "train.precision=fp32", "train.compile=off", "train.attention=sdpa"],
    "torch.compile (inductor C++)": [*WIDE, "train.precision=fp32", "train.compile=on", "train.attention=sdpa"],
    "bf16 autocast": [*WIDE, "train.precision=bf16", "train.compile=off", "train.attention=sdpa"],
    "bf16 autocast + compile": [*WIDE, "train.precision=bf16", "train.compile=on", "train.attention=sdpa"],
    "compile + math attention": [*WIDE, "train.precision=fp32", "train.compile=on", "train.attention=math"],
    "bf16 + compile + math attention": [*WIDE, "train.precision=bf16", "train.compile=on", "train.attention=math"],
    # the demo as it is: 192 wide (3 heads of 64), which learns as much per step (benchmarks/RESULTS.md)
    "192 wide, compile + math (AVX2 demo)": ["train.precision=fp32", "train.compile=on", "train.attention=math"],
    "192 wide, bf16 + compile + math": ["train.precision=bf16", "train.compile=on", "train.attention=math"],
}


def serve(name: str, overrides: list[str], start: int, total: int, conn) -> None:
    """One variant's trainer, in a process of its own (the C allocator's setting is the whole process's):
    set up, warm, then run the steps it is asked for and send back their times."""
    import prx.model
    import prx.train

    if name.startswith("as first measured"):  # the step as issue #11 measured it, in what the model and process do:
        prx.model.packs_text = prx.train.packs_text = lambda device: False  # every text token projected, padding too
        prx.train.keep_freed_memory = lambda: False  # glibc's allocator as it was: fresh pages for every activation
    cfg = load_config("demo", ["logging.sample_every=0", "logging.tensorboard=false", "logging.progress_bar=false",
                               "train.async_checkpoint=false", *overrides])
    online = name == "online text encoding"
    text = TextEncoder.from_config(cfg.text, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, text_encoder=text, log=lambda *a, **k: None)
        trainer.setup()
        if name.startswith("as first measured"):  # AdamW as it was: one parameter at a time, not fused,
            for group in trainer.optimizer.param_groups:
                group["fused"], group["foreach"] = False, False
            trainer.data.render_ahead = False  # and each batch rendered when its step asks for it
        if not online:  # every caption of the timed steps encoded beforehand
            for step in range(start - 2, start + total):
                text.encode(trainer.data.batch(step, 0, cfg.stages[0]).captions + [""])
        else:  # the cache of a run at step `start`: the captions it has met so far
            for step in range(0, start - 2):
                text.encode(trainer.data.batch(step, 0, cfg.stages[0]).captions)
        began = time.perf_counter()
        for step in range(start - 2, start):  # warm-up (and compilation)
            trainer.train_step(step)
        trainer.timer = timer = PhaseTimer(trainer.device)
        trainer.data.finish_rendering()
        conn.send(time.perf_counter() - began)
        while (job := conn.recv()) is not None:
            first, steps = job
            timer.enabled, seconds = True, []
            for step in range(first, first + steps):
                began = time.perf_counter()
                trainer.train_step(step)
                seconds.append(time.perf_counter() - began)
            timer.enabled = False
            trainer.data.finish_rendering()  # nothing of this variant runs while the next one is timed
            conn.send((seconds, timer.seconds.get("text encoder", 0.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--start", type=int, default=300, help="the demo step the timing starts at (a warm run)")
    ap.add_argument("--only", nargs="*", help="variant names to run (default all)")
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else ("AMX" if "amx_bf16" in flags else "AVX2-only")
    restricted = [v for v in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(v)]
    if restricted:
        kind += f" restricted to {torch.backends.cpu.get_cpu_capability()} kernels ({' / '.join(restricted)})"
        if "MKL_ENABLE_INSTRUCTIONS" not in restricted:
            print("warning: MKL_ENABLE_INSTRUCTIONS is not set: fp32 matmuls still use this CPU's widest vectors",
                  file=sys.stderr)
    print(f"CPU: {kind}, {torch.get_num_threads()} threads; bf16 matmuls are "
          f"{'faster' if fast_matmul_dtype('cpu') == torch.bfloat16 else 'slower'} than fp32 here", flush=True)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    unknown = set(args.only or []) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}: choose from {list(VARIANTS)}")
    total = args.rounds * args.steps
    # One process per variant, set up one after another and then timed in turns (one computes at a time, the
    # others wait on their pipe), so a busy moment of the machine hits every variant alike.
    context = multiprocessing.get_context("spawn")
    workers, seconds, text_seconds = {}, {name: [] for name in variants}, {name: 0.0 for name in variants}
    try:
        for name, overrides in variants.items():
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(name, overrides, args.start, total, theirs), daemon=True)
            process.start()
            workers[name] = (process, ours)
            print(f"  set up {name}: first steps {ours.recv():.1f} s", file=sys.stderr, flush=True)
        for r in range(args.rounds):
            for name, (_, conn) in workers.items():
                conn.send((args.start + r * args.steps, args.steps))
                times, text = conn.recv()
                seconds[name] += times
                text_seconds[name] += text
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                conn.send(None)
                process.join(timeout=30)
    baseline = statistics.median(seconds[next(iter(variants))])  # the first variant run
    print(f"{'variant':<38} {'s/step':>8} {'steps/s':>8} {'× first row':>12}   text encoder")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<38} {median:8.3f} {1 / median:8.2f} {baseline / median:11.2f}×   "
              f"{text_seconds[name] / len(times):.3f} s")


if __name__ == "__main__":
    main()
