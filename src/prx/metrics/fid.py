"""FID (Heusel et al. 2017): the Fréchet distance between Inception-v3 pool features of real and
generated images, with the standard FID weights (``pt_inception-2015-12-05-6726825d.pth``) and
pytorch-fid's preprocessing (bilinear resize to 299×299, scaled to [-1, 1]).

FID is biased by the sample count: below 2048 samples per side the 2048-d covariance is
rank-deficient. Always report the sample count with the number.
"""

from __future__ import annotations

from pathlib import Path

from prx.metrics.extractors import InceptionExtractor
from prx.metrics.stats import FrechetMetric


class FID(FrechetMetric):
    name = "fid"
    min_samples_unbiased = 2048

    def __init__(self, extractor: InceptionExtractor | None = None, weights: str | Path | None = None, **kwargs):
        super().__init__(extractor if extractor is not None else InceptionExtractor(weights), **kwargs)
