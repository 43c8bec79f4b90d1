"""Inference: a model plus its text encoder and config, turning prompts into images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from prx.checkpoint import checkpoint_config, checkpoint_meta, load_weights, open_checkpoint
from prx.config import Config, config_from_saved
from prx.config.safe_yaml import load_yaml
from prx.config.sampling import SamplingConfig
from prx.data.buckets import make_buckets, nearest_bucket
from prx.device import available_memory, check_memory, resolve_device
from prx.errors import PrxError
from prx.execution import plan_inference
from prx.lora import adapt, merge_lora
from prx.model import PRX, build_model, param_count, token_count
from prx.sampling import check_request, guided_predictor, initial_noise, sample, sampling_bytes, to_uint8
from prx.text import TextEncoder
from prx.tread import TREADRouter


class Pipeline:
    def __init__(self, model: PRX, text_encoder: TextEncoder, config: Config, device: torch.device | None = None):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.config = config
        self.device = device or next(model.parameters()).device
        self.autocast = plan_inference(config, self.device).autocast
        self._empty = None
        self.checkpoint: Path | None = None  # the checkpoint directory the weights came from, and its step
        self.step: int | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", device: str = "auto",
                        text_encoder: TextEncoder | None = None, text_cache_size: int | None = None) -> "Pipeline":
        """Load a checkpoint (or a run directory's latest, or a ``prx export`` file) for sampling;
        ``weights`` is 'ema' or 'model'. ``text_cache_size``: captions whose encodings are kept
        (default: the run's text.cache_size; 0 for many distinct prompts, so memory stays flat)."""
        if weights not in ("ema", "model"):
            raise ValueError("weights must be 'ema' or 'model'")
        if str(path).endswith(".safetensors"):
            return cls.from_export(path, device, text_encoder, text_cache_size)
        checkpoint, config, step, model = load_checkpoint_model(path, weights, device)
        pipe = cls._assemble(model, config, device, text_encoder, text_cache_size)
        pipe.checkpoint, pipe.step = checkpoint, step
        return pipe

    @staticmethod
    def _build(config: Config, device: str, what: str) -> PRX:
        return build_saved_model(config, device, what)

    @classmethod
    def from_export(cls, path: str | Path, device: str = "auto", text_encoder: TextEncoder | None = None,
                    text_cache_size: int | None = None) -> "Pipeline":
        """Load weights written by ``prx export`` (one safetensors file, its config in the metadata)."""
        path = Path(path)
        if not path.is_file():
            raise PrxError(f"export '{path}' does not exist: write one with `prx export --checkpoint RUN --out FILE`")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors' own error types vary by version
            raise PrxError(f"export '{path}' is damaged or not a safetensors file ({_brief(e, 120)})") from None
        if "prx_config" not in meta:
            raise PrxError(f"{path} was not written by `prx export` (no prx_config metadata)")
        try:
            data = load_yaml(meta["prx_config"], f"the prx_config of export '{path}'")
            config = config_from_saved(data if isinstance(data, dict) else {"": data})
        except (yaml.YAMLError, PrxError) as e:
            raise PrxError(f"export '{path}' has a prx_config this prx cannot read ({_brief(e)})") from None
        model = cls._build(config, device, f"export '{path}'")
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001
            raise PrxError(f"export '{path}' does not hold this model's weights ({_brief(e)})") from None
        return cls._assemble(model, config, device, text_encoder, text_cache_size)

    @classmethod
    def _assemble(cls, model: PRX, config: Config, device: str, text_encoder: TextEncoder | None,
                  text_cache_size: int | None = None) -> "Pipeline":
        dev = resolve_device(device)
        text = config.text if text_cache_size is None else replace(config.text, cache_size=text_cache_size)
        return cls(model.to(dev), text_encoder or TextEncoder.from_config(text, dev), config, dev)

    def image_size(self, width: int | None = None, height: int | None = None,
                   resolution: int | None = None) -> tuple[int, int]:
        """(width, height) to sample at: the given sides (multiples of the patch), else a square of
        ``resolution`` (default: the run's last-stage resolution)."""
        if (width is None) != (height is None):
            raise PrxError("give both --width and --height (or --aspect-ratio)")
        if width is None:
            width = height = resolution or self.config.stages[-1].resolution
        patch = self.config.model.patch_size
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % patch:
                lower = value // patch * patch
                nearest = f"{lower} or {lower + patch}" if value > patch else f"{patch}"
                raise PrxError(f"--{name} {value} is not a positive multiple of the model's patch size {patch}: "
                               f"use {nearest}")
        return width, height

    def size_for_aspect_ratio(self, ratio: str | float) -> tuple[int, int]:
        """(width, height) of the aspect-ratio bucket of the run's last-stage resolution nearest to
        ``ratio`` (width/height: ``"16:9"``, ``"3:4"``, ``1.5``) — the shapes the model was trained on."""
        value = parse_aspect_ratio(ratio)
        d = self.config.data
        buckets = make_buckets(self.config.stages[-1].resolution, self.config.model.patch_size, d.min_aspect,
                               d.max_aspect)
        bucket = buckets[nearest_bucket(value, buckets)]
        return bucket.width, bucket.height

    @property
    def empty_caption(self):
        if self._empty is None:
            self._empty = self.text_encoder.encode([""]).to(self.device)
        return self._empty

    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None, *, batch_size: int = 64,
                 width: int | None = None, height: int | None = None, resolution: int | None = None,
                 **overrides) -> torch.Tensor:
        """uint8 images (B, H, W, 3); image i starts from noise seeded with ``sampling.seed`` + i.

        ``sampling``: how to sample (default the run's ``sampling:``), with ``overrides`` of its fields in place
        (``steps=20, guidance="cfg"``; None keeps the value). The size is ``width`` × ``height`` (multiples of the
        patch size), else a square of ``resolution`` (default: the run's last-stage resolution); see also
        :meth:`size_for_aspect_ratio`. Guidance 'self' uses the run's TREAD routing, a fixed route per image over its
        own token grid. For many prompts use :meth:`generate_batches`, which holds one batch at a time.
        """
        return torch.cat([images for _, images in self.generate_batches(
            prompts, sampling, batch_size=batch_size, width=width, height=height, resolution=resolution, **overrides)])

    @torch.no_grad()
    def generate_batches(self, prompts: list[str], sampling: SamplingConfig | None = None, *, batch_size: int = 64,
                         width: int | None = None, height: int | None = None, resolution: int | None = None,
                         numbers: list[int] | None = None, progress=None, **overrides):
        """Yields (index of the first prompt, uint8 images (b, H, W, 3)) batch by batch: memory stays
        that of one batch whatever the number of prompts. The same images as :meth:`generate`. ``numbers``: each
        prompt's number, its image's seed offset (default 0, 1, ...: a prompts file's line numbers keep an image's
        noise when other lines are blank); ``progress()`` is called after each sampling step. A batch, size or step
        count that cannot fit in the device's memory is one line, before anything is allocated."""
        s = (sampling or self.config.sampling).with_overrides(**overrides)
        numbers = list(range(len(prompts))) if numbers is None else numbers
        check_request(max(numbers, default=0) + 1, s, batch_size)
        width, height = self.image_size(width, height, resolution)
        self.check_fits(min(batch_size, len(prompts)), width, height, s)
        tokens = token_count(height, width, self.config.model.patch_size)
        router = None
        if s.guidance in ("self", "both"):
            router = TREADRouter.from_config(self.config.tread, s.seed)
            if router is None:
                raise PrxError("self-guidance needs the run's TREAD routing, but tread.route_ratio is 0: "
                               "use --guidance cfg")
        shift = self.config.objective.shift if s.shift is None else s.shift
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seeds = [s.seed + n for n in numbers[start : start + batch_size]]
            noise = initial_noise(len(chunk), height, width, seeds, self.config.objective.noise_scale,
                                  self.config.objective.noise_offset)
            cond = self.text_encoder.encode(chunk).to(self.device)
            route = None
            if router is not None:  # a fixed route per image for the whole generation
                route = router.fixed_route(tokens, self.config.model.num_layers, [n + 7_777_777 for n in seeds],
                                           self.device)
            predict = guided_predictor(self.model, cond, self.empty_caption, s.guidance, s.guidance_scale,
                                       s.self_guidance_scale, tuple(s.guidance_interval), route, self.autocast)
            x = sample(predict, noise.to(self.device), s.steps, s.sampler, shift, self.config.objective.t_clamp,
                       s.schedule, progress)
            yield start, to_uint8(x)

    def memory_needed(self, batch: int, width: int, height: int, sampling: SamplingConfig) -> int:
        """Bytes a batch of ``batch`` images of width × height needs besides the weights (:func:`sampling_bytes`)."""
        passes = 2 if sampling.guidance in ("cfg", "both") and sampling.guidance_scale != 1 else 1
        return sampling_bytes(self.config.model, batch, height, width, sampling.steps, passes,
                              self.config.text.max_length)

    def batch_that_fits(self, batch: int, width: int, height: int, sampling: SamplingConfig) -> int:
        """The largest batch up to ``batch`` that fits in the memory available now (0: not even one image)."""
        available, _ = available_memory(self.device)
        while batch > 0 and self.memory_needed(batch, width, height, sampling) > available:
            batch //= 2
        return batch

    def check_fits(self, batch: int, width: int, height: int, sampling: SamplingConfig) -> None:
        """One line, before anything is allocated, when sampling cannot fit: the memory it needs, what is
        available, and the largest step count, image size or batch that fits."""
        available, where = available_memory(self.device)
        need = self.memory_needed(batch, width, height, sampling)
        if need <= available:
            return
        gib, have = 2**30, f"the {available / 2**30:,.1f} GiB {where}"
        schedule = 16 * (sampling.steps + 1)
        if schedule > available // 2:
            raise PrxError(f"--steps {sampling.steps} needs {schedule / gib:,.1f} GiB for its schedule alone, more "
                           f"than half of {have}: use at most {available // 32:,} steps (a few dozen suffice)")
        if self.memory_needed(1, width, height, sampling) > available:
            p, side = self.config.model.patch_size, self.config.model.patch_size
            while self.memory_needed(1, side * 2, side * 2, sampling) <= available:
                side *= 2
            step = side
            while step > p:  # the largest multiple of the patch size, between side and 2·side
                step //= 2
                if self.memory_needed(1, side + step, side + step, sampling) <= available:
                    side += step
            side = side // p * p
            raise PrxError(f"sampling one {width}×{height} image needs about {need / batch / gib:,.1f} GiB, more than "
                           f"{have}: the largest square that fits is about {side}×{side} (--width {side} --height "
                           f"{side}; other aspect ratios of as many pixels fit too)")
        raise PrxError(f"sampling {batch} images of {width}×{height} together needs about {need / gib:,.1f} GiB, more "
                       f"than {have}: --batch-size {self.batch_that_fits(batch, width, height, sampling)} fits")


def build_saved_model(config: Config, device: str, what: str) -> PRX:
    """The model of a saved config, once it is known to fit in memory (a config can say anything)."""
    check_memory(param_count(config.model), resolve_device(device), "inference", f"the model of {what}")
    return build_model(config.model)


def load_checkpoint_model(path: str | Path, weights: str = "ema", device: str = "cpu",
                          check=None, merge: bool = True) -> tuple[Path, Config, int, PRX]:
    """(checkpoint directory, its config, its step, its model with the EMA or raw weights) of a checkpoint, or of a
    run's newest intact one (a damaged or pruned one gives way to the next, :func:`prx.checkpoint.open_checkpoint`).
    ``check(config)`` runs before the model is built. A LoRA run's model is its base with the adapters merged in
    (plain weights: the config returned says ``lora.enabled: false``), or with ``merge=False`` the adapted model."""
    def use(checkpoint: Path):
        step = int(checkpoint_meta(checkpoint)["step"])  # a damaged checkpoint stops here, naming the file
        config = checkpoint_config(checkpoint)
        if check is not None:
            check(config)
        model = build_saved_model(config, device, f"checkpoint '{checkpoint}'")
        if config.lora.enabled:  # a LoRA checkpoint holds adapters: on their base, merged (plain weights to sample)
            adapt(model, config.lora, config.model.init_from, checkpoint_meta(checkpoint).get("lora_base"), checkpoint)
        load_weights(checkpoint, model, weights)  # full tensors, whatever world size wrote the checkpoint
        if config.lora.enabled and merge:
            merge_lora(model)
            config = replace(config, lora=replace(config.lora, enabled=False))
        return checkpoint, config, step, model

    return open_checkpoint(path, use)


def _brief(error: BaseException, limit: int = 160) -> str:
    return " ".join(str(error).split())[:limit]


def parse_aspect_ratio(ratio: str | float) -> float:
    """``"16:9"`` / ``"16/9"`` / ``"1.78"`` / 1.78 → width / height."""
    text = str(ratio).strip()
    try:
        for sep in (":", "/", "x"):
            if sep in text:
                w, h = (float(part) for part in text.split(sep, 1))
                break
        else:
            w, h = float(text), 1.0
    except ValueError:
        w = h = float("nan")
    if not (w > 0 and h > 0 and w / h < float("inf")):
        raise PrxError(f"--aspect-ratio '{ratio}' is not an aspect ratio: write width:height, e.g. 16:9, 1:1 or 3:4")
    return w / h
