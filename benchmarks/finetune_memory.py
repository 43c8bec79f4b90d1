"""Fine-tuning memory: the planner's predictions checked against measured peaks on a CPU, then its table for the
released 7B PRXPixel at 512 and 1024 px on 24, 48 and 80 GB GPUs (LoRA), and a full fine-tune on 8 × 80 GB (FSDP2).

    PYTHONPATH=src nice -n 19 python benchmarks/finetune_memory.py            # both parts (~15 min on 2 cores)
    PYTHONPATH=src python benchmarks/finetune_memory.py --skip-7b             # the CPU check only
    PYTHONPATH=src python benchmarks/finetune_memory.py --skip-check          # the 7B tables only

The check: torch's own count of a real CPU step (the profiler with ``profile_memory=True`` reports every allocation
with c10's running total of allocated bytes; its peak over building the model and two AdamW steps of two
micro-batches each) against :func:`prx.memory.plan_memory` on one device without EMA, less the parts it labels as
estimates (CUDA context, the batch's text embeddings), at three model sizes, full fp32 and LoRA in bf16 autocast with
activation checkpointing. Nothing is timed.
"""

import argparse
import time
from dataclasses import replace

import torch

from prx.config import load_config
from prx.lora import LoRAConfig
from prx.memory import GiB, plan_memory, text_encoder_spec
from prx.memory_trace import count_params, measured_step_peak
from prx.released import prxpixel_7b_model_config, qwen3_vl_2b_text_config

MiB = 2**20
SIZES = [("S", 256, 4, 4), ("M", 512, 6, 8), ("L", 768, 8, 12)]  # name, hidden, blocks, heads
MODES = [("full, fp32", None, "fp32", False), ("LoRA r8, bf16 autocast, checkpointing", LoRAConfig(rank=8), "bf16", True)]


def check(resolution: int = 256, micro_batch: int = 2, batch: int = 4, text_tokens: int = 32) -> list[float]:
    print(f"## Planner vs measured peak, CPU ({resolution}×{resolution} px, patch 16, micro-batch {micro_batch} × "
          f"{batch // micro_batch}, {text_tokens} text tokens of width 384, AdamW, two optimizer steps)\n")
    print("| model | params | mode | predicted MiB | measured MiB | error |")
    print("|---|---:|---|---:|---:|---:|")
    errors = []
    for name, hidden, blocks, heads in SIZES:
        cfg = replace(load_config("tiny").model, hidden_dim=hidden, num_layers=blocks, num_heads=heads, patch_size=16,
                      bottleneck_dim=128, text_dim=384)
        for mode, lora, precision, checkpointing in MODES:
            plan = plan_memory(cfg, resolution=resolution, batch_size=batch, gpu_memory=10**6, lora=lora,
                               precision=precision, ema=False, text_tokens=text_tokens, micro_batch=micro_batch,
                               checkpointing=checkpointing, text="precomputed", sharding="none", cpu_offload=False)
            estimated = sum(p.bytes for p in plan.components if p.note.startswith("estimate")
                            or p.name.startswith("text: precomputed"))
            predicted = plan.peak - estimated
            measured = measured_step_peak(cfg, lora=lora, height=resolution, width=resolution, micro_batch=micro_batch,
                                          text_tokens=text_tokens, micro_batches=batch // micro_batch,
                                          checkpointing=checkpointing,
                                          autocast=torch.bfloat16 if precision == "bf16" else None, optimizer_steps=2)
            errors.append((predicted - measured) / measured)
            print(f"| {name} ({hidden}×{blocks}) | {count_params(cfg).total / 1e6:.1f}M | {mode} | {predicted / MiB:.1f} "
                  f"| {measured / MiB:.1f} | {errors[-1]:+.1%} |", flush=True)
    print(f"\nlargest error {max(abs(e) for e in errors):.1%}\n")
    return errors


def tables_7b(lora_batch: int = 16, full_batch: int = 64) -> None:
    model = prxpixel_7b_model_config()
    text = text_encoder_spec(qwen3_vl_2b_text_config(), "Qwen3-VL-2B text")
    lora = LoRAConfig(rank=16)
    counts = count_params(model, lora)
    print(f"## 7B PRXPixel (shape of Photoroom/prxpixel-t2i: {count_params(model).total / 1e9:.2f}B parameters), LoRA "
          f"rank 16 on every block's attention and MLP ({counts.trained / 1e6:.1f}M trained), AdamW, EMA of the "
          f"adapters, bf16; batch {lora_batch}; text encoder {text.name} ({text.params / 1e9:.2f}B) on the GPU or "
          f"precomputed\n")
    print("| px | GPU | fits | micro-batch | checkpointing | text | peak GiB | same micro-batch without checkpointing |")
    print("|---:|---:|---|---:|---|---|---:|---:|")
    shown = None
    for resolution in (512, 1024):
        for gib in (24, 48, 80):
            plan = plan_memory(model, resolution=resolution, batch_size=lora_batch, gpu_memory=gib, lora=lora,
                               text_encoder=text)
            c = plan.choice
            plain = f"{plan.without_checkpointing / GiB:.1f}" if plan.without_checkpointing else "—"
            print(f"| {resolution} | {gib} GiB | {'yes' if plan.fits else 'NO'} | {c.micro_batch} | "
                  f"{'on' if c.checkpointing else 'off'} | {'GPU' if c.text == 'gpu' else 'precomputed'} | "
                  f"{plan.peak / GiB:.1f} | {plain} |", flush=True)
            if resolution == 1024 and gib == 24:
                shown = plan
    print("\n### 1024 px on a 24 GiB GPU, in full\n")
    print(shown.describe())
    for gpus, gib in ((8, 80), (1, 80)):
        for resolution in (1024, 512) if gpus == 8 else (1024,):
            print(f"\n### Full fine-tune, {resolution} px, batch {full_batch}, {gpus} × {gib} GiB\n")
            plan = plan_memory(model, resolution=resolution, batch_size=full_batch, gpu_memory=gib, gpus=gpus,
                               text_encoder=text)
            print(plan.describe(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    if not args.skip_check:
        check()
    if not args.skip_7b:
        tables_7b()
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
