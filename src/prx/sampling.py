"""Samplers for the x-prediction flow: Euler and Heun over the shifted schedule, with
classifier-free guidance (the empty caption as negative) and an optional guidance interval.

Guidance combines the x0 predictions, out = uncond + w·(cond − uncond); the x0 → velocity map
is affine, so this equals guiding in velocity space.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from prx.config.model import ModelConfig
from prx.config.sampling import SamplingConfig
from prx.errors import PrxError
from prx.flow import image_noise, shift_time, velocity
from prx.text import TextBatch
from prx.tread import Route

X0Predictor = Callable[["Tensor", "Tensor"], "Tensor"]  # (x_t, t scalar tensor) → x0




SEED_LIMIT = 2**63  # seeds are non-negative int64; image i uses seed + i


def check_request(count: int, sampling: SamplingConfig, batch_size: int) -> None:
    """The values of one sampling request (``prx sample``, ``prx eval``, ``Pipeline.generate``), each
    refused with a one-line message instead of a default, noise or a crash: ``count`` images from
    seeds seed .. seed + count − 1."""
    steps, seed = sampling.steps, sampling.seed
    guidance_scale, self_guidance_scale = sampling.guidance_scale, sampling.self_guidance_scale

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrxError(f"--steps must be a whole number ≥ 1 (sampling steps), got {steps}")
    for name, w in (("--guidance-scale", guidance_scale), ("--self-guidance-scale", self_guidance_scale)):
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise PrxError(f"{name} must be a finite number ≥ 0 (1 turns that guidance off), got {w}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrxError(f"--batch-size must be a whole number ≥ 1, got {batch_size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_LIMIT - count:
        raise PrxError(f"--seed must be a whole number in [0, 2**63 − {count}] ({count} image(s) use seeds seed .. "
                       f"seed + {count - 1}), got {seed}")


def sampling_bytes(model: ModelConfig, batch: int, height: int, width: int, steps: int, passes: int,
                   text_tokens: int) -> int:
    """An upper estimate of the memory a sampling batch needs beyond the weights: per image its buffers (noise, x,
    the predictions, the velocities), and one block's activations of each of the ``passes`` images the model sees at
    once per image (2 with classifier-free guidance; the attention kernel holds no tokens × tokens matrix), with the
    text's keys and values; and the schedule of ``steps`` times. float32 throughout."""
    pixels = 3 * height * width
    tokens = (height // model.patch_size) * (width // model.patch_size)
    hidden, mlp = model.hidden_dim, int(model.hidden_dim * model.mlp_ratio)
    per_pass = tokens * (8 * hidden + 3 * mlp) + 2 * pixels + 2 * text_tokens * hidden
    return 4 * batch * (12 * pixels + passes * per_pass) + 16 * (steps + 1)


def sampling_schedule(steps: int, shift: float, kind: str = "linspace") -> Tensor:
    """Times from 1 (noise) to 0 (clean): (steps + 1,).

    linspace:  shift(linspace(1, 0, steps + 1)), evenly spaced then shifted (the reference code's);
    diffusers: shift(linspace(1, t_min, steps)) then 0, with t_min = shift(1/1000): the sigmas of diffusers'
               FlowMatchEulerDiscreteScheduler(shift=shift) to the last float32 bit (its init shifts its
               smallest training sigma, set_timesteps shifts again), so PRXPixelPipeline takes the same steps.
    """
    if kind == "linspace":
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()
    if kind != "diffusers":
        raise ValueError(f"unknown sampling schedule '{kind}': use 'diffusers' or 'linspace'")

    train_sigmas = torch.tensor([1.0, 1.0], dtype=torch.float32) / torch.tensor([1.0, 1000.0])  # float32, as diffusers
    t_max, t_min = (shift * train_sigmas / (1 + (shift - 1) * train_sigmas)).tolist()
    sigmas = np.linspace(t_max * 1000, t_min * 1000, steps) / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def initial_noise(num_images: int, height: int, width: int, seed: int | list[int], noise_scale: float = 1.0,
                  noise_offset: float = 0.0) -> Tensor:
    """Image i's starting noise depends only on (seed + i) (or on ``seed[i]``, a seed per image), never on the batch
    it is sampled in; drawn like the training noise (``objective.noise_scale``, ``noise_offset``)."""
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(num_images)]
    noise = [image_noise((3, height, width), torch.Generator().manual_seed(s), noise_offset) for s in seeds]
    return torch.stack(noise) * noise_scale


def guided_predictor(
    model: torch.nn.Module,
    cond: TextBatch,
    uncond: TextBatch | None = None,
    guidance: str = "cfg",
    guidance_scale: float = 1.0,
    self_guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    route: Route | None = None,
    autocast_dtype=None,
) -> X0Predictor:
    """x0 predictions with classifier-free guidance, TREAD self-guidance, or both.

    cfg:  out = uncond + w·(cond − uncond), the empty caption as negative;
    self: out = routed + w·(dense − routed), both with the real prompt; ``route`` is the fixed
          routing of this generation;
    both: out = dense + (w_cfg − 1)·(dense − uncond) + (w_self − 1)·(dense − routed).
    Outside ``guidance_interval`` (in t) the plain conditional prediction is used.
    """
    if guidance not in ("cfg", "self", "both"):
        raise ValueError(f"guidance must be 'cfg', 'self' or 'both', got '{guidance}'")
    use_cfg = guidance in ("cfg", "both") and uncond is not None and guidance_scale != 1.0
    use_self = guidance in ("self", "both") and self_guidance_scale != 1.0
    if use_self and route is None:
        raise ValueError("self-guidance needs a route (the routed pass)")

    n = cond.embeds.shape[0]
    both_texts = TextBatch.cat([cond, uncond.expand(n)]) if use_cfg else None

    def run(x: Tensor, t: Tensor, text: TextBatch, r: Route | None = None) -> Tensor:
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return model(x, t.expand(x.shape[0]).to(x.device), text.embeds, text.mask, route=r).x0.float()

    def predict(x: Tensor, t: Tensor) -> Tensor:
        active = guidance_interval[0] <= float(t) <= guidance_interval[1]
        if active and use_cfg:  # one batched pass for the conditional and unconditional predictions
            dense, dense_uncond = run(torch.cat([x, x]), t, both_texts).chunk(2)
        else:
            dense, dense_uncond = run(x, t, cond), None
        if not active:
            return dense
        out = dense
        if use_cfg:
            out = out + (guidance_scale - 1.0) * (dense - dense_uncond)
        if use_self:
            out = out + (self_guidance_scale - 1.0) * (dense - run(x, t, cond, route))
        return out

    return predict


def sample(
    predict_x0: X0Predictor,
    noise: Tensor,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    t_clamp: float = 0.05,
    schedule: str = "linspace",
    progress: Callable[[], None] | None = None,
) -> Tensor:
    """Integrate from noise (t = 1) to an image (t = 0) over ``sampling_schedule(steps, shift, schedule)``,
    without gradients; returns x in about [-1, 1]. ``progress`` is called after each step."""
    if sampler not in ("euler", "heun"):
        raise ValueError(f"unknown sampler '{sampler}': use 'euler' or 'heun'")
    times = sampling_schedule(steps, shift, schedule).to(noise.device)
    x = noise
    with torch.no_grad():
        for i in range(steps):
            t, t_next = times[i], times[i + 1]
            v = velocity(x, predict_x0(x, t), t.expand(x.shape[0]), t_clamp)
            x_euler = x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:
                v_next = velocity(x_euler, predict_x0(x_euler, t_next), t_next.expand(x.shape[0]), t_clamp)
                x = x + (t_next - t) * 0.5 * (v + v_next)
            else:
                x = x_euler
            if progress is not None:
                progress()
    return x


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (B, 3, H, W) → uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
