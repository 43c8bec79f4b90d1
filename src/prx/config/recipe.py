"""The recipe's sections: ``objective:`` (x-prediction flow matching), ``tread:``, ``repa:``, ``perceptual:``,
``optimizer:`` and ``ema:``. Each trick's module (:mod:`prx.tread`, :mod:`prx.repa`, ...) takes its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prx.config.rules import at_least, check, one_of, positive, within


@dataclass
class ObjectiveConfig:
    """``objective:`` x-prediction flow matching; x_t = (1-t)·x0 + t·noise, t=1 is pure noise."""

    t_mean: float = 0.0  # logit-normal location
    t_std: float = positive(1.0)  # logit-normal scale
    shift: float = positive(3.0)  # t' = s·t / (1 + (s-1)·t); 1 disables
    uniform_fraction: float = within(0.1, 0, 1)  # this share of t is drawn from U[t_min, 1), unshifted
    t_min: float = within(1e-3, 0, 1, open_high=True)
    t_clamp: float = within(0.05, 0, 1, open_low=True, open_high=True)  # velocity denominator max(t, t_clamp)
    noise_scale: float = positive(1.0)
    # offset noise: ε gets a random per-image, per-channel constant of this std on top, in training and
    # sampling alike. The mean of white noise over an image is tiny (std 1/√pixels), so a model barely
    # sees it and draws every image with the same global brightness; an offset makes it visible.
    noise_offset: float = at_least(0.0, 0, hint=" (0 disables)")


@dataclass
class TreadConfig:
    """``tread:`` route_ratio of the image tokens skip blocks start_block..end_block (training only)."""

    route_ratio: float = within(0.5, 0, 1, open_high=True, hint=" (0 disables)")
    start_block: int = 2  # 0-based; negative counts from the end
    end_block: int = -2  # inclusive: -2 is the penultimate block

    def check(self, run) -> None:
        if self.route_ratio > 0:
            n = run.model.num_layers
            ok = -n <= self.start_block < n and -n <= self.end_block < n and self.start_block % n <= self.end_block % n
            check(ok, f"tread.start_block={self.start_block}..tread.end_block={self.end_block} is not a block range of "
                      f"a {n}-block model: use 0 ≤ start ≤ end < {n} (negative values count from the end)")


@dataclass
class REPAConfig:
    """``repa:`` alignment of a block's output with a frozen vision teacher."""

    teacher: str = "dinov3"  # dinov3 | dinov2 | a hub id | a local directory
    weight: float = at_least(0.5, 0, hint=" (0 disables)")
    block: int = 8  # the output of the 8th block (counted from 1, as in the REPA paper)
    projector_dim: int = at_least(2048, 1)

    # a resumed run keeps these: the trained projector maps to this teacher's features
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("teacher", "projector_dim")

    def check_resume(self, saved: "REPAConfig") -> None:
        """REPA cannot be switched on or off in a resumed run: the projector is trained state."""
        check((saved.weight > 0) == (self.weight > 0),
              f"repa.weight cannot go from {saved.weight:g} to {self.weight:g} in a resumed run: the REPA projector "
              f"{'is' if saved.weight > 0 else 'is not'} part of its checkpoints; switch REPA per stage with "
              f"train.stages[i].repa, or use --out for a new run")

    def check(self, run) -> None:
        n = run.model.num_layers
        check(self.weight == 0 or 1 <= self.block <= n,
              f"repa.block={self.block} must be between 1 and model.num_layers={n} (it counts blocks from 1)")


@dataclass
class PerceptualConfig:
    """``perceptual:`` LPIPS-VGG and DINOv2 losses on the predicted x0 against x0."""

    lpips_weight: float = at_least(0.1, 0, hint=" (0 disables)")
    dino_weight: float = at_least(0.01, 0, hint=" (0 disables)")
    t_threshold: float = within(1.0, 0, 1, open_low=True)  # apply where t < t_threshold; 1 = all noise levels
    dino_model: str = "dinov2"  # dinov2 | a hub id | a local directory
    dino_resolution: int = positive(224)
    lpips_resize: float = within(0.5, 0, 1, open_low=True)
    lpips_vgg_weights: str | None = None  # torchvision vgg16-397923af.pth; None = $TORCH_HOME/hub/checkpoints/
    lpips_heads: str | None = None  # lpips' vgg.pth; None = the installed lpips package's, else prx's copy


@dataclass
class OptimizerConfig:
    """``optimizer:`` the optimizers and the LR schedule."""

    name: str = one_of("muon", "adamw")  # muon: Muon for 2D block matrices + Adam for the rest
    lr: float = positive(1e-4, hint=": a learning rate like 1e-4")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = positive(1e-8)
    weight_decay: float = at_least(0.0, 0)
    warmup_steps: int = at_least(1000, 0)  # linear warm-up, then constant
    # warm-up / stable / decay: the last `decay_fraction` of the steps decays linearly to lr·min_lr_ratio
    decay_fraction: float = within(0.0, 0, 1)
    min_lr_ratio: float = within(0.0, 0, 1)
    grad_clip: float = at_least(1.0, 0, hint=" (0 disables)")  # max global grad norm
    muon_lr: float | None = positive(None)  # None = lr (Muon's update RMS is matched to Adam's)
    muon_momentum: float = within(0.95, 0, 1, open_high=True)
    muon_nesterov: bool = True
    muon_ns_steps: int = at_least(5, 1)
    muon_rms_scale: bool = True  # scale updates by 0.2·√max(m, n) to match Adam's RMS

    # everything else (lr, schedule, betas, clipping, ...) may change when a run resumes: the
    # hyperparameters come from the config, only the optimizers' state tensors from the checkpoint
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("name",)

    def check(self, run) -> None:
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
              f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class EMAConfig:
    """``ema:`` ema ← decay·ema + (1 − decay)·weights every ``update_every`` optimizer steps."""

    decay: float = within(0.999, 0, 1, open_high=True)
    update_every: int = at_least(10, 1)
    # decay_n = min(decay, (1+n)/(10+n)) over the n-th update: short runs need it
    warmup: bool = False
