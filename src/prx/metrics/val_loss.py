"""Validation loss: the trainer's flow loss (:func:`prx.flow.flow_loss`) on held-out images, overall
and by noise level t ∈ [0, 0.3), [0.3, 0.6), [0.6, 1].

Each held-out sample i gets a fixed noise image and a fixed t ~ U[t_min, 1) drawn from a
generator seeded by (seed, i) alone, so the same sample always gets the same noise and time —
across calls, batch positions and world sizes. (Uniform t fills the three bins alike; the
training distribution would leave the low-noise bin nearly empty.) Per-sample losses are kept
with their index and summed in index order, so the result is bitwise repeatable when the
per-sample forward passes are (the evaluator runs every sample in the same batch whatever the
world size).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prx.flow import add_noise, flow_loss, image_noise
from prx.metrics import VAL_LOSS_BINS
from prx.metrics.stats import PrxMetric
from prx.text import TextBatch

BINS = VAL_LOSS_BINS


def bin_name(low: float, high: float) -> str:
    return f"t in [{low:.1f}, {high:.1f}{']' if high >= 1 else ')'}"


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, sample index)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(index), 0x7A1]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def fixed_noise_and_time(index: int, shape: tuple[int, ...], seed: int, t_min: float,
                         offset: float = 0.0) -> tuple[Tensor, float]:
    """Sample ``index``'s ε (drawn like the training noise, offset included) and t, from its own generator."""
    g = sample_generator(seed, index)
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    t = min(t_min + (1 - t_min) * u, 1 - 1e-6)
    return image_noise(shape, g, offset), t


def encode_batch(text_encoder, captions: list[str]) -> TextBatch:
    """The captions encoded together, bypassing the encoder's cache: a caption's embedding then
    depends only on the batch it is in (the cache would return whatever batch first met it)."""
    return text_encoder.encode(captions, cache=False)


class ValLoss(PrxMetric):
    """``add_images(images, captions, indices)`` runs the denoiser on held-out images at their fixed
    noise and time; ``compute()`` → {"value" (overall), "bins": {name: (value, n)}, "num_samples"}."""

    name = "val_loss"
    higher_is_better = False

    def __init__(self, model, text_encoder, objective, seed: int = 0, autocast_dtype: torch.dtype | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self._parts = (model, text_encoder)  # a tuple: not registered as submodules of the metric
        self.objective, self.seed, self.autocast_dtype = objective, seed, autocast_dtype
        self._cat_shapes = {"index": ((), torch.long), "t": ((), torch.float64), "loss": ((), torch.float64)}
        for name in self._cat_shapes:
            self.add_state(name, [], dist_reduce_fx="cat")

    @torch.no_grad()
    def per_sample(self, images: Tensor, captions: list[str], indices: list[int]) -> tuple[Tensor, Tensor]:
        """uint8 images (B, 3, H, W) → (t, loss) per sample, float64."""
        model, text_encoder = self._parts
        device = next(model.parameters()).device
        x0 = images.float().to(device) / 127.5 - 1.0
        draws = [fixed_noise_and_time(i, tuple(x0.shape[1:]), self.seed, self.objective.t_min,
                                      self.objective.noise_offset) for i in indices]
        noise = torch.stack([d[0] for d in draws]).to(device) * self.objective.noise_scale
        t = torch.tensor([d[1] for d in draws], dtype=torch.float32, device=device)
        x_t = add_noise(x0, noise, t)
        text = encode_batch(text_encoder, captions).to(device)
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            x0_pred = model(x_t, t, text.embeds, text.mask).x0
        losses = [flow_loss(x0_pred[i:i + 1], x0[i:i + 1], x_t[i:i + 1], t[i:i + 1], self.objective.t_clamp)
                  for i in range(x0.shape[0])]
        return t.double().cpu(), torch.stack(losses).double().cpu()

    def update(self, loss: Tensor, t: Tensor, index: Tensor) -> None:
        self.loss.append(loss.double().reshape(-1).to(self.device))
        self.t.append(t.double().reshape(-1).to(self.device))
        self.index.append(torch.as_tensor(index, dtype=torch.long).reshape(-1).to(self.device))

    def add_images(self, images: Tensor, captions: list[str], indices: list[int]) -> None:
        t, loss = self.per_sample(images, captions, indices)
        self.update(loss, t, torch.tensor(indices))

    def compute(self) -> dict:
        order = torch.argsort(dim_cat(self.index), stable=True)
        t, loss = dim_cat(self.t)[order], dim_cat(self.loss)[order]
        bins = {}
        for low, high in BINS:
            inside = (t >= low) & ((t <= high) if high >= 1 else (t < high))
            n = int(inside.sum())
            bins[bin_name(low, high)] = {"value": loss[inside].mean() if n else torch.tensor(float("nan")),
                                         "n": torch.tensor(n)}
        return {"value": loss.mean() if loss.numel() else torch.tensor(float("nan")), "bins": bins,
                "num_samples": torch.tensor(int(loss.numel()))}


def dim_cat(state) -> Tensor:
    from torchmetrics.utilities import dim_zero_cat

    return dim_zero_cat(state) if isinstance(state, Tensor) or state else torch.zeros(0)
