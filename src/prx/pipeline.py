"""Inference: a model plus its text encoder and config, turning prompts into images."""

from __future__ import annotations

from pathlib import Path

import torch

from prx.checkpoint import checkpoint_config, find_checkpoint, load_checkpoint
from prx.config import Config
from prx.model import PRX, build_model
from prx.runtime import autocast_dtype, resolve_device
from prx.sampling import cfg_predictor, initial_noise, sample, to_uint8
from prx.text import TextEncoder


class Pipeline:
    def __init__(self, model: PRX, text_encoder: TextEncoder, config: Config, device: torch.device | None = None):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.config = config
        self.device = device or next(model.parameters()).device
        self.autocast = autocast_dtype(config.train.precision, self.device)
        self._empty = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", device: str = "auto",
                        text_encoder: TextEncoder | None = None) -> "Pipeline":
        """Load a checkpoint (or a run directory's latest) for sampling; ``weights`` is 'ema' or 'model'."""
        if weights not in ("ema", "model"):
            raise ValueError("weights must be 'ema' or 'model'")
        path = find_checkpoint(path)
        config = checkpoint_config(path)
        dev = resolve_device(device)
        model = build_model(config.model)
        state = {"ema": {"model": model.state_dict()}} if weights == "ema" else {"model": model.state_dict()}
        load_checkpoint(path, state)
        model.to(dev)
        if text_encoder is None:
            t = config.text
            text_encoder = TextEncoder(t.encoder, t.max_length, t.dtype, dev, t.cache_size)
        return cls(model, text_encoder, config, dev)

    @property
    def empty_caption(self):
        if self._empty is None:
            self._empty = self.text_encoder.encode([""]).to(self.device)
        return self._empty

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        resolution: int | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """uint8 images (B, H, W, 3); image i starts from noise seeded with seed + i."""
        s = self.config.sampling
        steps = steps or s.steps
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        interval = tuple(guidance_interval or s.guidance_interval)
        sampler = sampler or s.sampler
        seed = s.seed if seed is None else seed
        res = resolution or self.config.data.resolution
        noise = initial_noise(len(prompts), res, res, seed, self.config.objective.noise_scale)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cond = self.text_encoder.encode(chunk).to(self.device)
            predict = cfg_predictor(self.model, cond, self.empty_caption, guidance_scale, interval, self.autocast)
            x = sample(predict, noise[start : start + batch_size].to(self.device), steps, sampler,
                       self.config.sampling_shift, self.config.objective.t_clamp)
            out.append(to_uint8(x))
        return torch.cat(out)
