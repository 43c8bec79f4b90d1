"""What one Muon + Adam optimizer step costs against what its Newton–Schulz FLOPs predict.

For a model preset: the Muon matrices' Newton–Schulz FLOPs (``prx.flops.newton_schulz_flops``), the
rate this device reaches in fp32 and in bf16 on exactly those matmuls (the iteration itself, timed
alone, matrix by matrix), the prediction (FLOPs ÷ the faster rate), and the measured optimizer step,
side by side in one run: prx's Muon (same-shape matrices stacked) in the dtype it picks for this device,
with its memory-bound work compiled (``train.compile_optimizer``) and forced to fp32, torch.optim.Muon (matrix by matrix, bf16 always), and AdamW.

    python benchmarks/muon_cost.py --preset demo --patch-size 16     # the 9.4M-parameter demo model
    python benchmarks/muon_cost.py --preset seed --repeats 2          # the 576M seed model (slow on CPU)
    python benchmarks/muon_cost.py --preset seed --device cuda        # on a GPU, where launches count
"""

import argparse

import torch

from common import add_model_args, build_bench_model, median_seconds
from prx.device import fast_matmul_dtype
from prx.flops import newton_schulz_flops
from prx.muon import newton_schulz
from prx.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, model = build_bench_model(args)
    model = model.to(device)
    shapes = [tuple(p.shape) for p in model.muon_params]
    flops = newton_schulz_flops(shapes, 5)
    grads = [torch.randn(s, device=device) for s in shapes]

    def timed(fn):
        def synced():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return median_seconds(synced, args.repeats)

    def iteration(dtype):
        return lambda: [newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype) for g in grads]

    rate = {name: flops / timed(iteration(dtype)) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = max(rate, key=rate.get)
    predicted = flops / rate[best]

    def optimizer_step(kind: str):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        matrices = {id(p) for p in model.muon_params}
        muon = [q for p, q in zip(model.parameters(), params) if id(p) in matrices]
        rest = [q for p, q in zip(model.parameters(), params) if id(p) not in matrices]
        if kind == "adamw":
            opt = build_optimizer([{"params": params, "optimizer": "adam"}])
        else:
            opt = build_optimizer([{"params": muon, "optimizer": "muon"}, {"params": rest, "optimizer": "adam"}],
                                  compile_muon=kind == "prx-compiled")
            if kind == "torch-bf16":  # torch.optim.Muon's own step, in place of prx's
                opt.optimizers[0] = torch.optim.Muon(muon, lr=1e-4, adjust_lr_fn="match_rms_adamw")
            if kind == "prx-fp32":
                opt.optimizers[0].ns_dtype = torch.float32  # the path of CPUs without fast bf16
        for q in params:
            q.grad = torch.randn_like(q)
        return timed(opt.step), getattr(opt.optimizers[0], "ns_dtype", None)

    picked = fast_matmul_dtype(device.type)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(shapes)} Muon "
          f"matrices ({len(set(shapes))} shapes), Newton–Schulz {flops / 1e9:.2f} GFLOP per step; {where}")
    print(f"matmul rate on these matrices, one by one: fp32 {rate['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{rate['bf16'] / 1e9:.1f} GFLOP/s → predicted {predicted:.4f} s per step ({best}); prx picks "
          f"{str(picked).replace('torch.', '')}")
    for kind in ("prx", "prx-compiled", "prx-fp32", "torch-bf16", "adamw"):
        seconds, dtype = optimizer_step(kind)
        label = {"prx": f"prx Muon ({str(dtype).replace('torch.', '')}) + Adam", "prx-fp32": "prx Muon forced to fp32 "
                                                                                             "+ Adam",
                 "prx-compiled": "prx Muon, compiled passes + Adam",
                 "torch-bf16": "torch.optim.Muon (bf16) + Adam", "adamw": "AdamW, all parameters"}[kind]
        rate_used = rate["fp32"] if kind == "prx-fp32" else rate["bf16"] if kind == "torch-bf16" else rate[best]
        ratio = f"  {seconds * rate_used / flops:5.2f}× its dtype's prediction" if kind != "adamw" else ""
        print(f"  {label:<34} {seconds:8.4f} s{ratio}")


if __name__ == "__main__":
    main()
