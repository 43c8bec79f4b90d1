"""x-prediction flow matching (JiT), in the time convention t = 1 is pure noise.

    x_t = (1 − t)·x0 + t·ε,   ε ~ N(0, noise_scale²)
    v   = (x_t − x0) / max(t, t_clamp)          (= ε − x0 once t ≥ t_clamp)
    the network predicts x̂0; its velocity is v̂ = (x_t − x̂0) / max(t, t_clamp)
    loss = mean((v̂ − v)²)
"""

from __future__ import annotations

import torch
from torch import Tensor

from prx.config.recipe import ObjectiveConfig


def step_seed(seed: int, step: int) -> int:
    """Randomness of training step ``step`` depends only on (seed, step): resume replays it exactly."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def image_noise(shape: tuple[int, ...], generator, offset: float = 0.0, device=None) -> Tensor:
    """One image's ε: white noise, plus a per-channel constant of std ``offset`` (offset noise)."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn(shape[0], 1, 1, generator=generator, device=device)
    return noise


def sample_noise(shape: tuple[int, ...], seed: int, step: int, first: int, device, offset: float = 0.0) -> Tensor:
    """Noise of samples first, first+1, … of the step's global batch, each from its own generator:
    a rank draws only its own samples, and the draws do not depend on the world size."""
    out = []
    for i in range(shape[0]):
        sample_seed = step_seed(seed, step) ^ ((first + i + 1) * 0x9E3779B97F4A7C15 % 2**62)
        g = torch.Generator(device=device).manual_seed(sample_seed)
        out.append(image_noise(shape[1:], g, offset, device))
    return torch.stack(out)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = s·t / (1 + (s−1)·t): s > 1 spends more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, cfg: ObjectiveConfig, generator=None, device=None) -> Tensor:
    """Logit-normal(μ, σ) times, shifted, with a share drawn uniformly (unshifted); all in [t_min, 1)."""
    normal = torch.randn(n, generator=generator) * cfg.t_std + cfg.t_mean
    t = shift_time(torch.sigmoid(normal), cfg.shift)
    uniform = torch.rand(n, generator=generator) * (1 - cfg.t_min) + cfg.t_min
    use_uniform = torch.rand(n, generator=generator) < cfg.uniform_fraction
    t = torch.where(use_uniform, uniform, t)
    # float32 cannot hold 1 − 1e-7; keep t strictly below 1 so x_t always carries some signal.
    t = t.clamp(cfg.t_min, 1 - 1e-6)
    return t.to(device) if device is not None else t


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity(x_t: Tensor, x0: Tensor, t: Tensor, t_clamp: float) -> Tensor:
    """The velocity implied by a clean-image estimate x0 at x_t: (x_t − x0) / max(t, t_clamp)."""
    t = t.view(-1, *([1] * (x_t.dim() - 1))).clamp_min(t_clamp)
    return (x_t - x0) / t


def flow_loss(x0_pred: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, t_clamp: float) -> Tensor:
    """MSE in velocity space between the prediction and the target (per-sample mean, then batch mean)."""
    diff = velocity(x_t, x0_pred.float(), t, t_clamp) - velocity(x_t, x0, t, t_clamp)
    return diff.pow(2).flatten(1).mean(1).mean()
