"""CLIP score (Hessel et al. 2021; torchmetrics' ``CLIPScore``): how well an image matches its
prompt, 100·max(cos(E_image, E_text), 0) averaged over the images, with CLIP's projected image
and text embeddings (prompts truncated to CLIP's 77 tokens).

The same score of the real images against their own captions is reported beside it: the
ceiling the data allows with this CLIP model. (torchmetrics clamps the mean rather than each
image's cosine; the two agree unless some cosines are negative, which real CLIP models
practically never give for a caption and its image.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from prx.metrics.extractors import CLIP_ID, ClipExtractor
from prx.metrics.stats import PrxMetric


def clip_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Per-pair 100·max(cos, 0) of (B, D) embeddings (normalised here, in float64)."""
    a = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    b = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    return 100 * (a * b).sum(-1).clamp_min(0)


class CLIPScore(PrxMetric):
    name = "clip_score"
    higher_is_better = True

    def __init__(self, extractor: ClipExtractor | None = None, model: str = CLIP_ID, **kwargs):
        super().__init__(**kwargs)
        self.set_extractor(extractor if extractor is not None else ClipExtractor(model, text=True))
        for side in ("real", "fake"):
            self.add_state(f"{side}_score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_embeds: Tensor, text_embeds: Tensor, real: bool = False) -> None:
        side = "real" if real else "fake"
        scores = clip_scores(image_embeds, text_embeds).to(self.real_score.device)
        getattr(self, f"{side}_score").add_(scores.sum())
        getattr(self, f"{side}_n").add_(scores.shape[0])

    def add_images(self, images: Tensor, prompts: list[str], real: bool = False) -> None:
        self.update(self.extractor(images), self.extractor.encode_text(prompts), real)

    def compute(self) -> dict:
        n, n_real = int(self.fake_n), int(self.real_n)
        out = {"value": self.fake_score / max(n, 1), "num_fake": torch.tensor(n), "num_real": torch.tensor(n_real)}
        if n_real:
            out["real_images"] = self.real_score / n_real
        return out
