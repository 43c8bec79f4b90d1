"""Quality metrics for real-data runs: FID, FD-DINOv2, CMMD, CLIP score and the validation loss by
noise level, each a torchmetrics ``Metric`` (states reduced across ranks) with its own feature
extractor. :func:`prx.metrics.evaluate_real.evaluate_real` runs them on held-out shards.
"""

from __future__ import annotations

from prx.errors import PrxError

CLIP_ID = "openai/clip-vit-large-patch14-336"  # CMMD's CLIP (and the CLIP score's, by default)
DINOV2_ID = "facebook/dinov2-large"  # FD-DINOv2's ViT-L/14 (Stein et al. 2023)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of TF's FID Inception
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE

VAL_LOSS_BINS = ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0))  # the validation loss's bins of t; the last includes t = 1

METRICS = {
    "fid": "FID: Fréchet distance of Inception-v3 pool features (standard FID weights), lower is better",
    "fd_dinov2": "FD-DINOv2: Fréchet distance of DINOv2 ViT-L/14 CLS features at 224 px, lower is better",
    "cmmd": "CMMD: RBF-MMD (σ=10, ×1000) of CLIP ViT-L/14-336 image embeddings, lower is better",
    "clip_score": "CLIP score: 100·max(cos(image, prompt), 0), higher is better",
    "val_loss": "validation flow loss, overall and by t bin, at fixed noise per sample, lower is better",
}


def parse_metrics(text: str | list[str]) -> list[str]:
    """'fid,cmmd' → ['fid', 'cmmd'] (order kept, duplicates dropped), or a one-line error."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise PrxError(f"--metrics is empty: give a comma-separated list of {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise PrxError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}: "
                       f"valid metrics are {', '.join(METRICS)}")
    return list(dict.fromkeys(names))
