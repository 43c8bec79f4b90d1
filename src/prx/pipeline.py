"""Inference: a model plus its text encoder and config, turning prompts into images."""

from __future__ import annotations

from pathlib import Path

import torch

from prx.checkpoint import checkpoint_config, find_checkpoint, load_checkpoint
from prx.config import Config
from prx.errors import PrxError
from prx.model import PRX, build_model
from prx.runtime import autocast_dtype, resolve_device
from prx.sampling import guided_predictor, initial_noise, sample, to_uint8
from prx.text import TextEncoder
from prx.tread import TREADRouter


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
        """Load a checkpoint (or a run directory's latest, or a ``prx export`` file) for sampling;
        ``weights`` is 'ema' or 'model'."""
        if weights not in ("ema", "model"):
            raise ValueError("weights must be 'ema' or 'model'")
        if str(path).endswith(".safetensors"):
            return cls.from_export(path, device, text_encoder)
        path = find_checkpoint(path)
        config = checkpoint_config(path)
        dev = resolve_device(device)
        model = build_model(config.model)
        # the trainer saves the denoiser (and the REPA projector) under "model", the EMA under "ema"
        weights_state = model.state_dict()
        state = ({"ema": {"model": weights_state}} if weights == "ema"
                 else {"model": {f"denoiser.{k}": v for k, v in weights_state.items()}})
        load_checkpoint(path, state)
        model.to(dev)
        if text_encoder is None:
            t = config.text
            text_encoder = TextEncoder(t.encoder, t.max_length, t.dtype, dev, t.cache_size)
        return cls(model, text_encoder, config, dev)

    @classmethod
    def from_export(cls, path: str | Path, device: str = "auto", text_encoder: TextEncoder | None = None) -> "Pipeline":
        """Load weights written by ``prx export`` (one safetensors file, its config in the metadata)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from prx.config import config_from_dict

        path = Path(path)
        if not path.is_file():
            raise PrxError(f"export '{path}' does not exist: write one with `prx export --checkpoint RUN --out FILE`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "prx_config" not in meta:
            raise PrxError(f"{path} was not written by `prx export` (no prx_config metadata)")
        import yaml

        from prx.checkpoint import migrate_saved_config

        config = config_from_dict(migrate_saved_config(yaml.safe_load(meta["prx_config"])))
        dev = resolve_device(device)
        model = build_model(config.model)
        model.load_state_dict(load_file(str(path)))
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
        guidance: str | None = None,
        self_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """uint8 images (B, H, W, 3); image i starts from noise seeded with seed + i.

        ``guidance``: 'cfg' (empty-caption negative), 'self' (TREAD self-guidance with the run's
        routing, a fixed route per image) or 'both'; None = the run's sampling.guidance.
        """
        s = self.config.sampling
        steps = steps or s.steps
        guidance = guidance or s.guidance
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        self_scale = s.self_guidance_scale if self_guidance_scale is None else self_guidance_scale
        interval = tuple(guidance_interval or s.guidance_interval)
        sampler = sampler or s.sampler
        seed = s.seed if seed is None else seed
        res = resolution or self.config.stages[-1].resolution
        noise = initial_noise(len(prompts), res, res, seed, self.config.objective.noise_scale)
        tokens = (res // self.config.model.patch_size) ** 2
        router = None
        if guidance in ("self", "both"):
            t = self.config.tread
            if t.route_ratio <= 0:
                raise PrxError("self-guidance needs the run's TREAD routing, but tread.route_ratio is 0: use --guidance cfg")
            router = TREADRouter(t.route_ratio, t.start_block, t.end_block)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cond = self.text_encoder.encode(chunk).to(self.device)
            route = None
            if router is not None:  # a fixed route per image for the whole generation
                seeds = [seed + 7_777_777 + i for i in range(start, start + len(chunk))]
                route = router.fixed_route(tokens, self.config.model.num_layers, seeds, self.device)
            predict = guided_predictor(self.model, cond, self.empty_caption, guidance, guidance_scale, self_scale,
                                       interval, route, self.autocast)
            x = sample(predict, noise[start : start + batch_size].to(self.device), steps, sampler,
                       self.config.sampling_shift, self.config.objective.t_clamp, s.schedule)
            out.append(to_uint8(x))
        return torch.cat(out)
