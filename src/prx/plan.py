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

from prx.checks import block_index
from prx.config import Config
from prx.data.buckets import make_buckets
from prx.flops import (denoiser_forward_flops, mlp_forward_flops, newton_schulz_flops, vgg16_lpips_forward_flops,
                       vit_forward_flops)
from prx.model import build_model
from prx.teachers import aspect_grid, teacher_shape
from prx.text import text_width
from prx.tread import TREADRouter


def _routing(cfg: Config, stage, num_layers: int, tokens: int) -> tuple[tuple[int, int] | None, int]:
    """(routed blocks, tokens they see) in a stage: the router's own answer."""
    router = TREADRouter.from_config(cfg.tread, 0) if cfg.tricks(stage).tread else None
    if router is None:
        return None, tokens
    return router.blocks(num_layers), router.num_kept(tokens)


def fmt_flops(x: float) -> str:
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} FLOP"


def step_flops(cfg: Config, stage, model_cfg=None, batch: int | None = None,
               size: tuple[int, int] | None = None, text_tokens: int | None = None,
               projected_text_tokens: float | None = None) -> dict[str, float]:
    """FLOPs of one optimizer step of ``stage`` for ``batch`` images (default: the stage's global batch)
    of ``size`` (height, width) pixels (default: the stage's square), by part: the denoiser with its
    routing (3× forward), each teacher, and Muon's Newton–Schulz. ``text_tokens`` is the captions' padded
    length (default ``text.max_length``, the longest), ``projected_text_tokens`` the tokens per sample the
    text projections run over (default all of them; a step's own count in ``prx bench``)."""
    model_cfg = model_cfg or replace(cfg.model, text_dim=cfg.model.text_dim or text_width(cfg.text.encoder) or 384)
    batch = stage.batch_size if batch is None else batch
    height, width = size or (stage.resolution, stage.resolution)
    text_tokens = text_tokens or cfg.text.max_length
    n = (height // model_cfg.patch_size) * (width // model_cfg.patch_size)
    on = cfg.tricks(stage)
    route, kept = _routing(cfg, stage, model_cfg.num_layers, n)
    parts = {"denoiser": 3 * denoiser_forward_flops(model_cfg, height, width, text_tokens, 1, route, kept,
                                                    projected_text_tokens) * batch}
    p = cfg.perceptual
    if on.repa and (teacher := teacher_shape(cfg.repa.teacher)) is not None:
        inside = route is not None and route[0] <= block_index(cfg.repa.block - 1, model_cfg.num_layers) <= route[1]
        d = cfg.repa.projector_dim
        parts["REPA teacher"] = vit_forward_flops(teacher, n) * batch
        parts["REPA projector"] = 3 * mlp_forward_flops([model_cfg.hidden_dim, d, d, teacher.hidden_size],
                                                        kept if inside else n) * batch
    if on.lpips:
        parts["LPIPS-VGG"] = 3 * vgg16_lpips_forward_flops(int(round(height * p.lpips_resize)),  # target, prediction,
                                                           int(round(width * p.lpips_resize))) * batch  # backward
    if on.dino and (teacher := teacher_shape(p.dino_model)) is not None:
        grid = aspect_grid(height, width, (p.dino_resolution // teacher.patch_size) ** 2)
        parts["DINO perceptual"] = 3 * vit_forward_flops(teacher, grid[0] * grid[1]) * batch
    if cfg.optimizer.name == "muon":
        with torch.device("meta"):
            shapes = [tuple(q.shape) for q in build_model(model_cfg).muon_params]
        parts["Muon Newton–Schulz"] = newton_schulz_flops(shapes, cfg.optimizer.muon_ns_steps)
    return parts


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
        f"{(muon + adam) / 1e6:.1f}M params), text '{cfg.text.encoder}' ({text_dim}-wide, {text_up_to}{text_tokens} tokens)",
    ]
    if cfg.optimizer.name == "muon":
        ns = newton_schulz_flops([tuple(p.shape) for p in model.muon_params], cfg.optimizer.muon_ns_steps)
        lines.append(f"optimizer groups: Muon {muon / 1e6:.1f}M params (2D block matrices, lr {cfg.optimizer.muon_lr or cfg.optimizer.lr:g}); "
                     f"Adam {(adam + projector) / 1e6:.1f}M params (the rest{' + REPA projector' if projector else ''}, "
                     f"lr {cfg.optimizer.lr:g}); Newton–Schulz {fmt_flops(ns)} per optimizer step, whatever the batch")
    else:
        lines.append(f"optimizer groups: AdamW {(muon + adam + projector) / 1e6:.1f}M params (lr {cfg.optimizer.lr:g})")
    for i, stage in enumerate(cfg.stages):
        res, batch = stage.resolution, stage.batch_size
        micro = cfg.train.micro_batch_size or batch
        n = (res // model_cfg.patch_size) ** 2
        on = cfg.tricks(stage)
        route, kept = _routing(cfg, stage, model_cfg.num_layers, n)
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
            f"{batch // micro} accumulation step{'s' if batch // micro > 1 else ''}) | {tokens} + {text_up_to}{text_tokens} text"
        )
        lines.append(f"  losses: {', '.join(terms)}")
        breakdown = ", ".join(f"{k} {fmt_flops(v)}" for k, v in per_step.items())
        lines.append(f"  FLOPs per step: {fmt_flops(total)} ({breakdown}); "
                     f"stage total {fmt_flops(total * stage.steps)}")
    return "\n".join(lines)
