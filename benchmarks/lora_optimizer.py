"""Muon vs AdamW on LoRA adapters, a toy regression on a CPU (no timing: final losses side by side).

A small PRX (random base) plays the teacher with a hidden rank-r update on every adapted projection; the student
is the same base with fresh LoRA adapters of that rank (B = 0). Both learn the teacher's x0 predictions on random
noisy images and captions. Each optimizer gets a small learning-rate sweep; the table prints the loss after N
steps relative to the first step's (lower is better), mean of the last 20 steps, over seeds.

    PYTHONPATH=src python benchmarks/lora_optimizer.py --steps 300
"""

import argparse
import statistics
from dataclasses import replace

import torch

from prx.config import load_config
from prx.lora import LoRAConfig, add_lora, lora_parameters
from prx.model import build_model


def base_model(seed: int, hidden: int, layers: int):
    cfg = replace(load_config("tiny").model, text_dim=32, hidden_dim=hidden, num_layers=layers,
                  num_heads=max(1, hidden // 32))
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # off the zero init of adaLN and the final layer
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def teacher_and_student(seed: int, rank: int, hidden: int, layers: int):
    teacher, student = base_model(seed, hidden, layers), base_model(seed, hidden, layers)
    cfg = LoRAConfig(rank=rank, alpha=rank)
    add_lora(teacher, cfg)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # the hidden update: random A and B, |ΔW| a sizeable fraction of |W|
        for p in lora_parameters(teacher):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    add_lora(student, cfg)
    return teacher.eval(), student.train()


def batch(g: torch.Generator, n: int = 4):
    x = torch.randn(n, 3, 32, 32, generator=g)
    text = torch.randn(n, 6, 32, generator=g)
    return x, torch.rand(n, generator=g), text, torch.ones(n, 6, dtype=torch.bool)


def run(optimizer: str, lr: float, seed: int, steps: int, rank: int, hidden: int, layers: int) -> float:
    teacher, student = teacher_and_student(seed, rank, hidden, layers)
    params = lora_parameters(student)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:  # the recipe's Muon: momentum 0.95, nesterov, 5 NS steps, update RMS matched to Adam's
        opt = torch.optim.Muon(params, lr=lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                               adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(seed + 7)
    losses = []
    for _ in range(steps):
        args = batch(g)
        with torch.no_grad():
            target = teacher(*args).x0
        loss = (student(*args).x0 - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return statistics.mean(losses[-20:]) / losses[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2", help="learning rates swept for both optimizers")
    ap.add_argument("--optimizers", default="adamw,muon")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"LoRA rank {args.rank} on a {args.layers}-block, {args.hidden}-wide PRX; {args.steps} steps, batch 4, "
          f"{args.seeds} seeds; loss after / loss at step 1 (mean of the last 20 steps)")
    print("| optimizer | lr | relative loss (per seed) | mean |")
    print("|---|---|---|---|")
    lrs = [float(x) for x in args.lrs.split(",")]
    for optimizer in args.optimizers.split(","):
        for lr in lrs:
            finals = [run(optimizer, lr, seed, args.steps, args.rank, args.hidden, args.layers)
                      for seed in range(args.seeds)]
            print(f"| {optimizer} | {lr:g} | {', '.join(f'{f:.4f}' for f in finals)} | {statistics.mean(finals):.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
