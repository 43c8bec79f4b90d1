"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the MMD between CLIP ViT-L/14-336 image
embeddings of real and generated images, with a Gaussian RBF kernel of σ = 10 on L2-normalised
embeddings, the biased (minimum-variance) estimator, reported ×1000 — as google-research's
cmmd and sayakpaul/cmmd-pytorch compute it. MMD makes no normality assumption and is unbiased
by the sample count in expectation (up to the O(1/n) diagonal term of the biased estimator).
"""

from __future__ import annotations

from prx.metrics.extractors import CLIP_ID, ClipExtractor
from prx.metrics.stats import KernelMMDMetric

SIGMA = 10.0
SCALE = 1000.0


class CMMD(KernelMMDMetric):
    name = "cmmd"

    def __init__(self, extractor: ClipExtractor | None = None, model: str = CLIP_ID, **kwargs):
        super().__init__(extractor if extractor is not None else ClipExtractor(model), sigma=SIGMA, scale=SCALE,
                         **kwargs)
