"""The report's numbers: the metrics of the table (what each is, which way is better, how it prints), and every
arm's mean ± spread over seeds with its verdict against ``full``.

The spread is the standard deviation over seeds (n − 1). An arm's difference to ``full`` is *beyond the seed
spread* (✱) when |Δ| > spread(arm) + spread(full): the two intervals mean ± spread do not touch. With one seed
there is no spread and no verdict. A judge rate's spread is at least one seed's binomial standard error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from prx.flops import fmt_flops


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str | None  # "lower" | "higher" | None (a cost, not a result: shown as a ratio to full)
    fmt: str = "{:.4f}"

    def format(self, value: float | None) -> str:
        if value is None:
            return "—"
        if self.fmt == "flops":
            return fmt_flops(value)
        return self.fmt.format(value)


METRICS = [
    Metric("val_loss", "val loss, held-out (all t)", "lower"),
    Metric("val_loss_t0.0-0.3", "val loss, t in [0, 0.3)", "lower"),
    Metric("val_loss_t0.3-0.6", "val loss, t in [0.3, 0.6)", "lower"),
    Metric("val_loss_t0.6-1.0", "val loss, t in [0.6, 1]", "lower"),
    Metric("judge/single_held_in", "shapes judge: single object, held-in (all correct)", "higher", "{:.1%}"),
    Metric("judge/single_held_out", "shapes judge: single object, held-out combos", "higher", "{:.1%}"),
    Metric("judge/two_objects", "shapes judge: two objects", "higher", "{:.1%}"),
    Metric("judge/three_objects", "shapes judge: three objects", "higher", "{:.1%}"),
    Metric("diversity/fd_single_held_in", "shapes diversity FD, single held-in (0 = the world's)", "lower", "{:.3f}"),
    Metric("fid", "FID", "lower", "{:.2f}"),
    Metric("fd_dinov2", "FD-DINOv2", "lower", "{:.2f}"),
    Metric("cmmd", "CMMD", "lower", "{:.3f}"),
    Metric("clip_score", "CLIP score", "higher", "{:.2f}"),
    Metric("steps", "steps", None, "{:.0f}"),
    Metric("flops", "training FLOPs", None, "flops"),
    Metric("train_seconds", "training time (s)", None, "{:.0f}"),
    Metric("images_per_s", "images/s", None, "{:.1f}"),
    Metric("wall_seconds", "arm wall time, with evaluation (s)", None, "{:.0f}"),
]
BEYOND = "✱"
NOT_COMPARED = "†"


@dataclass(frozen=True)
class Summary:
    mean: float | None
    spread: float | None  # standard deviation over seeds (n − 1); None below 2 seeds
    n: int


def summarize(values: list[float | None]) -> Summary:
    """Mean ± spread of the seeds' values (missing and non-finite values left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return Summary(None, None, 0)
    return Summary(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept))


def with_rate_floor(s: Summary, prompts: int) -> Summary:
    """A judge rate's spread is at least one seed's binomial standard error over its ``prompts`` (p taken as at
    least one prompt's worth): two seeds that both judge 0 of 60 prompts right do not make 1 of 60 a finding."""
    if s.mean is None:
        return s
    p = min(max(s.mean, 1 / prompts), 1 - 1 / prompts)
    return Summary(s.mean, max(s.spread or 0.0, math.sqrt(p * (1 - p) / prompts)), s.n)


def compare(arm: Summary, full: Summary) -> tuple[float | None, bool | None]:
    """(arm − full, whether that is beyond the seed spread: |Δ| > spread(arm) + spread(full); None when unknown)."""
    if arm.mean is None or full.mean is None:
        return None, None
    diff = arm.mean - full.mean
    if arm.spread is None or full.spread is None:
        return diff, None
    return diff, abs(diff) > arm.spread + full.spread
