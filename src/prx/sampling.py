"""Samplers for the x-prediction flow: Euler and Heun over the shifted schedule, with
classifier-free guidance (the empty caption as negative) and an optional guidance interval.

Guidance combines the x0 predictions, out = uncond + w·(cond − uncond); the x0 → velocity map
is affine, so this equals guiding in velocity space.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from prx.flow import shift_time, velocity
from prx.text import TextBatch

X0Predictor = Callable[[Tensor, Tensor], Tensor]  # (x_t, t scalar tensor) → x0


def sampling_schedule(steps: int, shift: float) -> Tensor:
    """Times from 1 (noise) to 0 (clean), evenly spaced then shifted: (steps + 1,)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def initial_noise(num_images: int, height: int, width: int, seed: int, noise_scale: float = 1.0) -> Tensor:
    """Image i's starting noise depends only on (seed + i), never on the batch it is sampled in."""
    noise = [
        torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed + i)) for i in range(num_images)
    ]
    return torch.stack(noise) * noise_scale


def cfg_predictor(
    model: torch.nn.Module,
    cond: TextBatch,
    uncond: TextBatch | None,
    guidance_scale: float,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    autocast_dtype: torch.dtype | None = None,
) -> X0Predictor:
    """x0 predictions with classifier-free guidance (scale 1 or no negative = plain conditional)."""
    guided = uncond is not None and guidance_scale != 1.0
    if guided:
        both = TextBatch.cat([cond, uncond.expand(cond.embeds.shape[0])])

    def predict(x: Tensor, t: Tensor) -> Tensor:
        use_guidance = guided and guidance_interval[0] <= float(t) <= guidance_interval[1]
        text = both if use_guidance else cond
        xs = torch.cat([x, x]) if use_guidance else x
        ts = t.expand(xs.shape[0]).to(x.device)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            x0 = model(xs, ts, text.embeds, text.mask).x0.float()
        if not use_guidance:
            return x0
        x0_cond, x0_uncond = x0.chunk(2)
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond)

    return predict


@torch.no_grad()
def sample(
    predict_x0: X0Predictor,
    noise: Tensor,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    t_clamp: float = 0.05,
) -> Tensor:
    """Integrate from noise (t = 1) to an image (t = 0); returns x in about [-1, 1]."""
    if sampler not in ("euler", "heun"):
        raise ValueError(f"unknown sampler '{sampler}': use 'euler' or 'heun'")
    times = sampling_schedule(steps, shift).to(noise.device)
    x = noise
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, predict_x0(x, t), t.expand(x.shape[0]), t_clamp)
        x_euler = x + (t_next - t) * v
        if sampler == "heun" and t_next > 0:
            v_next = velocity(x_euler, predict_x0(x_euler, t_next), t_next.expand(x.shape[0]), t_clamp)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (B, 3, H, W) → uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
