"""``sampling:`` how images are drawn (``prx sample``, sample grids, evaluation) and ``eval:`` held-out
evaluation during training."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from prx.config.rules import at_least, check, one_of, positive
from prx.metrics import CLIP_ID, DINOV2_ID, METRICS


@dataclass
class SamplingConfig:
    """``sampling:`` how samples and evaluations are drawn."""

    sampler: str = one_of("euler", "heun")
    steps: int = at_least(50, 1)
    guidance: str = one_of("cfg", "self", "both")  # cfg (empty-caption negative) | self (TREAD self-guidance) | both
    guidance_scale: float = at_least(3.5, 0)  # classifier-free guidance scale; 1 disables
    self_guidance_scale: float = at_least(3.5, 0)  # out = routed + w·(dense − routed); 1 disables
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    shift: float | None = positive(None)  # time shift of the sampling schedule; None = objective.shift
    # diffusers: shift(linspace(1, shift(1/1000), N)) then 0, exactly diffusers' FlowMatchEulerDiscreteScheduler,
    # so an exported run samples the same images in PRXPixelPipeline | linspace: shift(linspace(1, 0, N+1)), the
    # reference code's (and prx's before the option; runs saved then keep it)
    schedule: str = one_of("diffusers", "linspace")
    seed: int = 0

    def with_overrides(self, **given) -> "SamplingConfig":
        """This sampling with the given fields replaced; a value of None keeps this one's (a CLI option not given,
        an ``eval.*`` key left null). Unknown names fail: overrides are this dataclass's own fields."""
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def check(self, run) -> None:
        gi = self.guidance_interval
        check(len(gi) == 2 and 0.0 <= gi[0] <= gi[1] <= 1.0,
              f"sampling.guidance_interval must be [lo, hi] with 0 ≤ lo ≤ hi ≤ 1, got {gi}")
        check(self.guidance == "cfg" or run.tread.route_ratio > 0,
              f"sampling.guidance={self.guidance} needs TREAD routing (tread.route_ratio > 0) for its routed pass")


@dataclass
class EvalConfig:
    """``eval:`` which held-out metrics the run measures on its EMA weights, how often and how."""

    # steps between evaluations; null: train.checkpoint_every when eval.data is set (else off); 0: off
    every: int | None = at_least(None, 0, hint=" (0 = off)")
    data: list[str] = field(default_factory=list)  # held-out prx shards: directories, files or globs
    # val_loss is cheap (one forward per sample); fid, fd_dinov2, cmmd, clip_score sample every caption
    metrics: list[str] = field(default_factory=lambda: ["val_loss"])
    num_samples: int = at_least(1000, 1)
    batch_size: int = at_least(16, 1)  # samples per batch (each rank takes whole batches)
    seed: int = 0  # which held-out samples, and each one's noise (as prx eval --seed)
    resolution: int | None = positive(None)  # square size of real and generated images; null: the current stage's
    caption_column: str | None = None  # null: the shards' first caption column
    # sampling of the generated images (image metrics only); null: the run's sampling.* value
    steps: int | None = positive(None)
    guidance: str | None = None  # cfg | self | both
    guidance_scale: float | None = at_least(None, 0)
    self_guidance_scale: float | None = at_least(None, 0)
    sampler: str | None = None  # euler | heun
    # the extractors, as prx eval's --inception-weights / --clip-model / --dino-model
    inception_weights: str | None = None  # null: $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth
    clip_model: str = CLIP_ID
    dino_model: str = DINOV2_ID

    def cadence(self, run) -> int:
        """Steps between evaluations (0: no evaluation during training)."""
        if self.every is None:
            return run.train.checkpoint_every if self.data else 0
        return self.every

    def check(self, run) -> None:
        check(bool(self.metrics), f"eval.metrics is empty: give a list from {', '.join(METRICS)} (e.g. [val_loss])")
        unknown = [m for m in self.metrics if m not in METRICS]
        check(not unknown, f"eval.metrics has unknown metric{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(repr(m) for m in unknown)}: valid metrics are {', '.join(METRICS)}")
        check(not (self.every and not self.data),
              f"eval.every={self.every} needs held-out data: set eval.data=[DIR] (prx shards: directories, files or "
              f"globs), or eval.every=0")
        check(self.num_samples >= 2 or not {"fid", "fd_dinov2"} & set(self.metrics),
              f"eval.num_samples={self.num_samples}: FID and FD-DINOv2 need at least 2 samples (and thousands to mean "
              f"much)")
        check(self.guidance in (None, "cfg", "self", "both"),
              f"eval.guidance must be 'cfg', 'self' or 'both' (or null for sampling.guidance), got '{self.guidance}'")
        check(self.sampler in (None, "euler", "heun"),
              f"eval.sampler must be 'euler' or 'heun' (or null for sampling.sampler), got '{self.sampler}'")
        check(self.guidance in (None, "cfg") or run.tread.route_ratio > 0,
              f"eval.guidance={self.guidance} needs TREAD routing (tread.route_ratio > 0) for its routed pass")
        p = run.model.patch_size
        check(self.resolution is None or self.resolution % p == 0,
              f"eval.resolution={self.resolution} is not a multiple of model.patch_size={p}")

    def sampling(self, run_sampling: SamplingConfig) -> SamplingConfig:
        """The run's ``sampling:`` with the ``eval.*`` keys that name a sampling field (and are set) in place."""
        names = {f.name for f in fields(SamplingConfig)} - {"seed"}  # eval.seed picks held-out samples too
        return run_sampling.with_overrides(**{k: getattr(self, k) for k in names if hasattr(self, k)})
