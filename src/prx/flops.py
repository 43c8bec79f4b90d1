"""Analytic FLOP counts (2 FLOPs per multiply-add; matmuls and attention, not elementwise ops).

A training step costs 3× the forward pass (forward, and a backward that computes gradients with
respect to both activations and weights). Tests check these formulas against
``torch.utils.flop_counter.FlopCounterMode`` on real forward passes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from prx.config import Config
from prx.config.model import ModelConfig
from prx.config.rules import block_index
from prx.lora import adapter_params, add_lora
from prx.lpips import LPIPS_CHANNELS, VGG16_LAYOUT
from prx.model import build_model, token_count
from prx.teacher_shapes import teacher_shape
from prx.teachers import aspect_grid
from prx.text import text_width
from prx.tread import TREADRouter


def block_forward_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int,
                        projected_text_tokens: float | None = None) -> float:
    """One PRX block for one sample: image tokens are queries over [text; image] keys (``text_tokens``, padding
    included); ``projected_text_tokens`` (default all) of them go through the K/V projection (packs_text)."""
    d, n, length = cfg.hidden_dim, image_tokens, text_tokens
    projected = length if projected_text_tokens is None else projected_text_tokens
    mlp = int(round(d * cfg.mlp_ratio))
    keys = length + n
    macs = (
        d * 6 * d  # adaLN modulation (once per sample)
        + n * d * 3 * d  # image q, k, v
        + projected * d * 2 * d  # text k, v
        + 2 * n * keys * d  # attention scores and weighted sum
        + n * d * d  # attention output projection
        + n * d * 2 * mlp  # GeGLU gate and up
        + n * mlp * d  # GeGLU down
    )
    return 2 * macs


def denoiser_forward_flops(cfg: ModelConfig, height: int, width: int, text_tokens: int, batch: int = 1,
                           route: tuple[int, int] | None = None, kept_tokens: int | None = None,
                           projected_text_tokens: float | None = None) -> float:
    """The whole PRX forward pass for ``batch`` images of height × width pixels.

    With ``route=(start, end)`` (0-based, inclusive) the blocks start..end see only
    ``kept_tokens`` image tokens (TREAD); the others see all of them. ``text_tokens`` is the padded
    caption length, ``projected_text_tokens`` the tokens per sample the text projections run over
    (default all; on a CPU the real ones only, :func:`prx.model.packs_text`).
    """
    projected = text_tokens if projected_text_tokens is None else projected_text_tokens
    if cfg.text_dim is None:
        raise ValueError("cfg.text_dim must be set")
    d, p = cfg.hidden_dim, cfg.patch_size
    n = (height // p) * (width // p)
    routed = 0 if route is None else route[1] - route[0] + 1
    kept = n if kept_tokens is None else kept_tokens
    patch_dim = 3 * p * p
    macs = (
        n * (patch_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * d)  # bottleneck patch embedding
        + projected * cfg.text_dim * d  # text projection, once
        + 256 * d + d * d  # timestep MLP
        + d * 2 * d + n * d * patch_dim  # final adaLN and projection
    )
    blocks = ((cfg.num_layers - routed) * block_forward_flops(cfg, n, text_tokens, projected)
              + routed * block_forward_flops(cfg, kept, text_tokens, projected))
    return batch * (2 * macs + blocks)


def training_step_flops(cfg: ModelConfig, height: int, width: int, text_tokens: int, batch: int = 1,
                        route: tuple[int, int] | None = None, kept_tokens: int | None = None,
                        projected_text_tokens: float | None = None) -> float:
    return 3 * denoiser_forward_flops(cfg, height, width, text_tokens, batch, route, kept_tokens, projected_text_tokens)


def vgg16_lpips_forward_flops(height: int, width: int) -> int:
    """VGG16 convolutions up to relu5_3 (what LPIPS uses) on one image, plus the 1×1 heads."""
    macs, channels, h, w = 0, 3, height, width
    for v in VGG16_LAYOUT:
        if v == "M":
            h, w = h // 2, w // 2
        else:
            macs += h * w * channels * v * 9
            channels = v
    heads = sum(c * (height >> i) * (width >> i) for i, c in enumerate(LPIPS_CHANNELS))
    return 2 * (macs + heads)


def mlp_forward_flops(dims: list[int], tokens: int) -> int:
    return 2 * tokens * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def newton_schulz_flops(shapes: list[tuple[int, int]], steps: int = 5) -> int:
    """Muon's orthogonalisation per optimizer step: each quintic iteration on an m×n matrix
    (m ≤ n after the transpose) computes A = X·Xᵀ (2m²n), B = bA + cA² (2m³) and B·X (2m²n)."""
    total = 0
    for a, b in shapes:
        m, n = min(a, b), max(a, b)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def vit_forward_flops(shape, image_tokens: int) -> int:
    """Forward FLOPs of a ViT encoder (a transformers config, or :func:`prx.teachers.teacher_shape`) on
    one image of ``image_tokens`` patches (matmuls and attention)."""
    d = shape.hidden_size
    mlp = getattr(shape, "intermediate_size", None) or int(d * shape.mlp_ratio)  # DINOv2 configs give a ratio
    gated = bool(getattr(shape, "use_gated_mlp", False) or getattr(shape, "use_swiglu_ffn", False))
    n = image_tokens + 1 + int(getattr(shape, "num_register_tokens", 0) or 0)
    per_layer = n * (4 * d * d + (3 if gated else 2) * d * mlp) + 2 * n * n * d
    patch = image_tokens * 3 * shape.patch_size**2 * d
    return 2 * (shape.num_hidden_layers * per_layer + patch)


# --------------------------------------------------------------------------------------------
# A run's step, every part counted: the denoiser with its routing, the teachers, Newton–Schulz
# --------------------------------------------------------------------------------------------


def routing(cfg: Config, stage, num_layers: int, tokens: int) -> tuple[tuple[int, int] | None, int]:
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
    n = token_count(height, width, model_cfg.patch_size)
    on = cfg.tricks(stage)
    route, kept = routing(cfg, stage, model_cfg.num_layers, n)
    # forward + backward = 3 forwards; a LoRA run's frozen weights get no gradient: forward + input gradients = 2
    passes = 2 if cfg.lora.enabled else 3
    parts = {"denoiser": passes * denoiser_forward_flops(model_cfg, height, width, text_tokens, 1, route, kept,
                                                         projected_text_tokens) * batch}
    if cfg.lora.enabled:
        image, text = adapter_params(model_cfg, cfg.lora.rank, tuple(cfg.lora.targets))
        parts["LoRA adapters"] = 3 * 2 * (image * n + text * text_tokens) * batch
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
    if cfg.optimizer.name == "muon" and not (cfg.lora.enabled and cfg.lora.optimizer == "adamw"):
        with torch.device("meta"):
            model = build_model(model_cfg)
            if cfg.lora.enabled:  # Muon on the adapter matrices
                add_lora(model, cfg.lora)
            shapes = [tuple(q.shape) for q in model.muon_params]
        parts["Muon Newton–Schulz"] = newton_schulz_flops(shapes, cfg.optimizer.muon_ns_steps)
    return parts
