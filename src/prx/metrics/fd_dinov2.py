"""FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the
Fréchet distance on DINOv2 ViT-L/14 CLS features of images resized to 224×224 (bicubic) and
ImageNet-normalised — dgm-eval's default encoder and preprocessing. The 1024-d covariance wants
at least 1024 samples per side; fewer give a biased (too high) value.
"""

from __future__ import annotations

from prx.metrics.extractors import DINOV2_ID, DinoV2Extractor
from prx.metrics.stats import FrechetMetric


class FDDinoV2(FrechetMetric):
    name = "fd_dinov2"

    def __init__(self, extractor: DinoV2Extractor | None = None, model: str = DINOV2_ID, **kwargs):
        super().__init__(extractor if extractor is not None else DinoV2Extractor(model), **kwargs)
        self.min_samples_unbiased = self.num_features
