"""``prx train CONFIG --dry-run``: the resolved plan of a run, without loading (or creating) any weights.

Per stage: resolution, steps, global and micro batch, tokens per image, which losses are on
with their weights, parameters per optimizer group, and FLOPs per optimizer step. FLOPs count
the denoiser with its routing (3× forward for forward + backward) and the teachers honestly:
REPA's DINO forward on clean images, the projector (3×), LPIPS-VGG and the DINOv2 perceptual
net on both images plus the backward through them into x̂0 (≈ 3× one forward).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from prx.config import Config, StageConfig
from prx.config.rules import block_index
from prx.data.buckets import make_buckets
from prx.device import resolve_device
from prx.distributed import world_size_from_env
from prx.execution import block_shapes, plan_training
from prx.flops import fmt_flops, newton_schulz_flops, routing, step_flops
from prx.lora import adapter_params
from prx.model import build_model
from prx.teacher_shapes import teacher_shape
from prx.text import text_width
from prx.tread import TREADRouter


def describe_run(cfg: Config) -> str:
    """The dry run's report: the plan of the stages, then how it would execute on this machine."""
    return describe_plan(cfg) + "\n" + execution_plan(cfg).describe()


def execution_plan(cfg: Config):
    """The execution plan ``prx train`` would make here, without data or weights: every aspect-ratio bucket of a
    stage counts as used (the shapes world renders squares)."""
    def sizes(stage: StageConfig) -> list[tuple[int, int]]:
        if cfg.data.dataset == "shapes":
            return [(stage.resolution, stage.resolution)]
        return [(b.width, b.height) for b in make_buckets(stage.resolution, cfg.model.patch_size, cfg.data.min_aspect,
                                                          cfg.data.max_aspect)]

    router = TREADRouter.from_config(cfg.tread, 0)
    model_cfg = replace(cfg.model, text_dim=cfg.model.text_dim or text_width(cfg.text.encoder) or 384)
    with torch.device("meta"):
        muon_kinds = len({tuple(p.shape) for p in build_model(model_cfg).muon_params})
    world = world_size_from_env()
    return plan_training(cfg, resolve_device(cfg.train.device), world,
                         block_shapes(cfg, sizes, world, router.num_kept if router else None), muon_kinds)


def describe_plan(cfg: Config) -> str:
    text_dim = cfg.model.text_dim or text_width(cfg.text.encoder) or 384
    model_cfg = replace(cfg.model, text_dim=text_dim)
    with torch.device("meta"):
        model = build_model(model_cfg)
    muon = sum(p.numel() for p in model.muon_params)
    adam = sum(p.numel() for p in model.adam_params)
    repa_teacher = teacher_shape(cfg.repa.teacher) if cfg.repa.weight > 0 else None
    p = cfg.perceptual
    projector = 0
    if repa_teacher is not None:
        d = cfg.repa.projector_dim
        projector = (model_cfg.hidden_dim + 1) * d + (d + 1) * d + (d + 1) * repa_teacher.hidden_size
    text_tokens = cfg.text.max_length
    text_up_to = "" if cfg.text.min_length >= text_tokens else "≤"  # padded to max_length, or to the longest caption
    lines = [
        f"run '{cfg.name}': {len(cfg.stages)} stage(s), {cfg.total_steps} steps, model {model_cfg.preset or 'custom'} "
        f"({model_cfg.num_layers} blocks, hidden {model_cfg.hidden_dim}, patch {model_cfg.patch_size}, "
        f"{(muon + adam) / 1e6:.1f}M params), text '{cfg.text.encoder}' ({text_dim}-wide, {text_up_to}{text_tokens} "
        f"tokens)",
    ]
    if cfg.lora.enabled:
        image, text = adapter_params(model_cfg, cfg.lora.rank, tuple(cfg.lora.targets))
        lines.append(f"optimizer groups: LoRA adapters {(image + text) / 1e6:.2f}M params (rank {cfg.lora.rank}, "
                     f"{'AdamW' if cfg.lora.optimizer == 'adamw' else cfg.optimizer.name}, lr {cfg.optimizer.lr:g})"
                     f"{f' + Adam REPA projector {projector / 1e6:.1f}M' if projector else ''}; the base "
                     f"{(muon + adam) / 1e6:.1f}M params frozen (model.init_from)")
    elif cfg.optimizer.name == "muon":
        ns = newton_schulz_flops([tuple(p.shape) for p in model.muon_params], cfg.optimizer.muon_ns_steps)
        lines.append(f"optimizer groups: Muon {muon / 1e6:.1f}M params (2D block matrices, lr "
                     f"{cfg.optimizer.muon_lr or cfg.optimizer.lr:g}); Adam {(adam + projector) / 1e6:.1f}M params "
                     f"(the rest{' + REPA projector' if projector else ''}, lr {cfg.optimizer.lr:g}); Newton–Schulz "
                     f"{fmt_flops(ns)} per optimizer step, whatever the batch")
    else:
        lines.append(f"optimizer groups: AdamW {(muon + adam + projector) / 1e6:.1f}M params (lr {cfg.optimizer.lr:g})")
    for i, stage in enumerate(cfg.stages):
        res, batch = stage.resolution, stage.batch_size
        micro = cfg.train.micro_batch_size or batch
        n = (res // model_cfg.patch_size) ** 2
        on = cfg.tricks(stage)
        route, kept = routing(cfg, stage, model_cfg.num_layers, n)
        terms = [f"flow (x-prediction, shift {cfg.objective.shift:g})"]
        if on.repa:
            inside = route is not None and route[0] <= block_index(cfg.repa.block - 1, model_cfg.num_layers) <= route[1]
            terms.append(f"REPA {cfg.repa.weight:g} ({cfg.repa.teacher}, block {cfg.repa.block}"
                         f"{', visible tokens only' if inside else ''})")
        if on.lpips:
            terms.append(f"LPIPS {p.lpips_weight:g} (×{p.lpips_resize:g})")
        if on.dino:
            terms.append(f"DINO {p.dino_weight:g} ({p.dino_model} @ {p.dino_resolution})")
        if route is not None:
            terms.append(f"TREAD {cfg.tread.route_ratio:g} (blocks {route[0]}..{route[1]}: {kept}/{n} tokens)")
        per_step = {k: v for k, v in step_flops(cfg, stage, model_cfg).items() if k != "Muon Newton–Schulz"}
        total = sum(per_step.values())
        tokens = f"{n} image tokens"
        if cfg.data.dataset != "shapes":  # photos fall into aspect-ratio buckets of about n tokens each
            buckets = make_buckets(res, model_cfg.patch_size, cfg.data.min_aspect, cfg.data.max_aspect)
            counts = sorted(b.tokens(model_cfg.patch_size) for b in buckets)
            tokens = f"{counts[0]}–{counts[-1]} image tokens in {len(buckets)} aspect-ratio buckets ({n} square)"
        lines.append(
            f"stage {i + 1}: {res}px × {stage.steps} steps | batch {batch} (micro {micro}, "
            f"{batch // micro} accumulation step{'s' if batch // micro > 1 else ''}) | {tokens} + "
            f"{text_up_to}{text_tokens} text"
        )
        lines.append(f"  losses: {', '.join(terms)}")
        breakdown = ", ".join(f"{k} {fmt_flops(v)}" for k, v in per_step.items())
        lines.append(f"  FLOPs per step: {fmt_flops(total)} ({breakdown}); "
                     f"stage total {fmt_flops(total * stage.steps)}")
    return "\n".join(lines)
