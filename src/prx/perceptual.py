"""Perceptual losses on the predicted clean image (x-prediction makes x̂0 available at every t).

- LPIPS-VGG (:mod:`prx.lpips`) on the whole image, bilinearly downsampled ×0.5.
- DINOv2 patch-token cosine on the whole image resized to about 224×224 pixels: a square image
  to 224×224, a non-square one to the patch grid of its own aspect ratio with about as many
  patches (12×21 for a 1.75:1 bucket at patch 14), so wide photos are not squashed.

Both networks are frozen; gradients flow through them into x̂0. The targets' features are
computed without gradients. ``t_threshold`` gates by noise level: samples with t ≥ it get no
perceptual loss (1 = every sample, the recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prx.config.recipe import PerceptualConfig
from prx.lpips import LPIPS
from prx.stand_ins import resolve_vgg_weights
from prx.teachers import VisionTeacher, aspect_grid


class PerceptualLoss:
    """Weighted LPIPS-VGG and DINOv2 patch-cosine losses on x̂0 against x0, called as
    ``loss(x0_pred, x0, t)`` → ``{"lpips": ..., "dino": ...}`` (each already times its weight).

    ``apply_at_all_noise_levels`` (the recipe) uses every sample; otherwise only samples with
    t < ``t_threshold`` contribute (noise-gating as in PixelGen).
    """

    def __init__(self, lpips_weight: float = 0.1, dino_weight: float = 0.01, apply_at_all_noise_levels: bool = True,
                 t_threshold: float = 1.0, dino_model: str = "dinov2", dino_resolution: int = 224,
                 lpips_resize: float = 0.5, lpips_vgg_weights: str | None = None, lpips_heads: str | None = None):
        self.config = PerceptualConfig(lpips_weight, dino_weight, 1.0 if apply_at_all_noise_levels else t_threshold,
                                       dino_model, dino_resolution, lpips_resize, lpips_vgg_weights, lpips_heads)
        self.lpips = None  # LPIPS network, loaded by load()
        self.dino = None  # VisionTeacher

    @classmethod
    def from_config(cls, cfg: PerceptualConfig) -> "PerceptualLoss | None":
        if cfg.lpips_weight == 0 and cfg.dino_weight == 0:
            return None
        return cls(cfg.lpips_weight, cfg.dino_weight, apply_at_all_noise_levels=cfg.t_threshold >= 1.0,
                   t_threshold=cfg.t_threshold, dino_model=cfg.dino_model, dino_resolution=cfg.dino_resolution,
                   lpips_resize=cfg.lpips_resize, lpips_vgg_weights=cfg.lpips_vgg_weights, lpips_heads=cfg.lpips_heads)

    @property
    def lpips_weight(self) -> float:
        return self.config.lpips_weight

    @property
    def dino_weight(self) -> float:
        return self.config.dino_weight

    def load(self, dtype=None) -> "PerceptualLoss":
        """Load the frozen networks (before step 0, so a missing one fails early)."""
        c = self.config
        if c.lpips_weight > 0 and self.lpips is None:
            self.lpips = LPIPS(resolve_vgg_weights(c.lpips_vgg_weights), c.lpips_heads)
        if c.dino_weight > 0 and self.dino is None:
            self.dino = VisionTeacher.load(c.dino_model, dtype, "perceptual.dino_model")
        return self

    def to(self, device) -> "PerceptualLoss":
        for net in (self.lpips, self.dino):
            if net is not None:
                net.to(device)
        return self

    def __call__(self, x0_pred, x0, t) -> dict:
        c = self.config
        gate = (t < c.t_threshold).float() if c.t_threshold < 1.0 else torch.ones_like(t, dtype=torch.float32)
        denom = gate.sum().clamp_min(1.0)
        terms = {}
        if self.lpips is not None:
            size = [max(1, int(round(s * c.lpips_resize))) for s in x0.shape[-2:]]
            pred = F.interpolate(x0_pred.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            with torch.no_grad():
                target = F.interpolate(x0.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            terms["lpips"] = c.lpips_weight * (self.lpips(pred, target) * gate).sum() / denom
        if self.dino is not None:
            grid = aspect_grid(*x0.shape[-2:], (c.dino_resolution // self.dino.patch_size) ** 2)
            with torch.no_grad():
                target_features = self.dino(x0, grid)
            pred_features = self.dino(x0_pred, grid)
            cos = F.cosine_similarity(pred_features.float(), target_features.float(), dim=-1)  # (B, patches)
            terms["dino"] = c.dino_weight * ((1 - cos).mean(1) * gate).sum() / denom
        return terms
