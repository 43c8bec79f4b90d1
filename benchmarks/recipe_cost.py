"""What each part of the recipe costs per training step, measured side by side in one run.

For a model and resolution (batch 1 by default, fp32, CPU unless --device cuda): the step time of
the dense model, with TREAD routing, then with each extra loss term on top of TREAD (REPA with
DINOv3-L, LPIPS-VGG16, DINOv2-B perceptual), and everything together; then the optimizer step
alone, Muon (2D block matrices) + Adam versus AdamW on all parameters. Teachers are built at their
real sizes with random weights (same FLOPs as the real ones; no download needed).

    python benchmarks/recipe_cost.py --preset demo --patch-size 16 --resolution 256   # a small model
    python benchmarks/recipe_cost.py --preset seed --resolution 512                   # the seed config
"""

import argparse

import torch

from common import add_model_args, build_bench_model, median_seconds
from prx.flops import training_step_flops
from prx.flow import add_noise, flow_loss
from prx.lpips import LPIPS
from prx.optim import build_optimizer
from prx.perceptual import PerceptualLoss
from prx.repa import REPAAlignment
from prx.teachers import TEACHER_IDS, TEACHER_SHAPES, VisionTeacher
from prx.tread import TREADRouter


def random_teacher(name: str) -> VisionTeacher:
    import transformers as tf

    shape = TEACHER_SHAPES[TEACHER_IDS[name]]  # the real architecture, random weights: the same FLOPs
    cfg = tf.DINOv3ViTConfig(**shape) if name == "dinov3" else tf.Dinov2WithRegistersConfig(**shape)
    return VisionTeacher(tf.AutoModel.from_config(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    cfg, model = build_bench_model(args)
    model = model.to(dev)
    g = torch.Generator().manual_seed(0)
    b, r = args.batch, args.resolution
    x0 = (torch.rand(b, 3, r, r, generator=g) * 2 - 1).to(dev)
    text = torch.randn(b, args.text_tokens, args.text_dim, generator=g).to(dev)
    mask = torch.ones(b, args.text_tokens, dtype=torch.bool, device=dev)
    t = torch.full((b,), 0.5, device=dev)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=g).to(dev), t)
    grid = (r // cfg.patch_size,) * 2
    tokens = grid[0] * grid[1]
    router = TREADRouter(0.5, 2, -2)
    route = router.route(b, tokens, cfg.num_layers, step=0, device=dev)
    repa_block = min(8, cfg.num_layers)

    print(f"{args.preset} model, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {r} px ({tokens} "
          f"tokens), batch {b}, {args.text_tokens} text tokens, {dev}, {torch.get_num_threads()} threads")
    print("building full-size teachers with random weights (DINOv3-L/16, DINOv2-B/14 with registers, VGG16) …")
    repa = REPAAlignment("dinov3", 0.5, repa_block).setup(cfg.hidden_dim, cfg.num_layers, teacher=random_teacher("dinov3")).to(dev)
    perceptual = PerceptualLoss(0.1, 0.01)
    perceptual.lpips = LPIPS(pretrained=False).to(dev)
    perceptual.dino = random_teacher("dinov2").to(dev)
    lpips_only = PerceptualLoss(0.1, 0.0)
    lpips_only.lpips = perceptual.lpips
    dino_only = PerceptualLoss(0.0, 0.01)
    dino_only.dino = perceptual.dino

    def step(use_route=False, use_repa=False, perc=None):
        def run():
            out = model(x_t, t, text, mask, route=route if use_route else None,
                        capture_block=repa.block_index if use_repa else None)
            loss = flow_loss(out.x0, x0, x_t, t, 0.05)
            if perc is not None:
                loss = loss + sum(perc(out.x0, x0, t).values())
            if use_repa:
                loss = loss + repa(out.hidden, x0, grid, out.hidden_index)
            loss.backward()
            model.zero_grad(set_to_none=True)
            repa.projector.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    rows = [
        ("dense (flow loss only)", step()),
        ("TREAD 50%, blocks 2..-2", step(use_route=True)),
        ("TREAD + REPA (DINOv3-L)", step(use_route=True, use_repa=True)),
        ("TREAD + LPIPS-VGG16", step(use_route=True, perc=lpips_only)),
        ("TREAD + DINOv2-B perceptual", step(use_route=True, perc=dino_only)),
        ("TREAD + all three (the recipe)", step(use_route=True, use_repa=True, perc=perceptual)),
    ]
    results = {name: median_seconds(fn, args.repeats) for name, fn in rows}
    dense, tread = results[rows[0][0]], results[rows[1][0]]
    kept = router.num_kept(tokens)
    start, end = router.blocks(cfg.num_layers)
    flops_dense = training_step_flops(cfg, r, r, args.text_tokens, b)
    flops_tread = training_step_flops(cfg, r, r, args.text_tokens, b, (start, end), kept)
    print(f"\nforward + backward (median of {args.repeats}):")
    print(f"{'configuration':<34} {'s/step':>8} {'vs dense':>9} {'vs TREAD':>9}")
    for name, seconds in results.items():
        print(f"{name:<34} {seconds:>8.3f} {seconds / dense:>8.2f}× {seconds / tread:>8.2f}×")
    print(f"TREAD speed-up {dense / tread:.2f}× measured; denoiser FLOPs say {flops_dense / flops_tread:.2f}× "
          f"({end - start + 1} of {cfg.num_layers} blocks at {kept}/{tokens} tokens; the text K/V, embeddings and "
          f"final layer are not routed)")
    for name in list(results)[2:5]:
        print(f"  added by {name.split('+ ')[1]:<26} {results[name] - tread:+.3f} s/step")

    # Optimizer step alone, on the same gradients.
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon = build_optimizer([
        {"params": model.muon_params, "optimizer": "muon", "lr": 1e-4, "momentum": 0.95, "nesterov": True,
         "ns_steps": 5, "rms_scale": True},
        {"params": model.adam_params, "optimizer": "adam", "lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8},
    ])
    adam = build_optimizer([{"params": list(model.parameters()), "optimizer": "adam", "lr": 1e-4}])

    def opt_step(opt):
        def run():
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    t_muon, t_adam = median_seconds(opt_step(muon), args.repeats), median_seconds(opt_step(adam), args.repeats)
    print(f"\noptimizer step: Muon + Adam {t_muon:.3f} s, AdamW {t_adam:.3f} s ({t_muon / t_adam:.2f}×); "
          f"as a share of the recipe step: {t_muon / results[rows[-1][0]]:.1%} vs {t_adam / results[rows[-1][0]]:.1%}")


if __name__ == "__main__":
    main()
