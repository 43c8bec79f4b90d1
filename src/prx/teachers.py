"""Frozen vision teachers (DINOv2, DINOv3) loaded through Hugging Face ``transformers``, their
shapes, and random stand-ins for machines without their weights.

A teacher is named by a short name (``dinov2``, ``dinov3``), a hub id, or a local directory.
Hub ids resolve from the local Hugging Face cache first, so weights downloaded once work with
no network. A teacher that cannot be loaded stops the run before step 0 with a message that says
where prx looked and how to supply the weights.

Stand-ins (:data:`STAND_INS`): ``tiny-random-dinov2``, ``tiny-random-dinov3`` (toy-sized teachers
for tests and ``configs/speedrun-tiny.yaml``), ``tiny-random-vgg16`` (the LPIPS trunk, full size),
``random-dinov2-base`` and ``random-dinov3-vitl16`` (the real teachers' architectures with random
weights: the same FLOPs, for benchmarks). They are written once under ``$PRX_CACHE`` the first
time they are loaded and then read by the very same code paths as real weights; they test the
plumbing and teach the model nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx.errors import PrxError
from prx.stand_ins import stand_in_path
from prx.teacher_shapes import GATED, IMAGENET_MEAN, IMAGENET_STD, STAND_INS, TEACHER_IDS, TEACHER_SHAPES, teacher_shape  # noqa: F401


def resolve_teacher(name: str) -> str:
    """Short name → hub id; a stand-in → its local directory; a local directory or hub id as given."""
    if name in STAND_INS:
        return str(stand_in_path(name))
    return TEACHER_IDS.get(name, os.path.expanduser(name))


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _missing_teacher_message(name: str, ident: str, detail: str) -> str:
    if Path(ident).is_dir():
        return (f"teacher '{name}' could not be loaded from the local directory {ident} ({detail}): it must hold the "
                f"config.json and model.safetensors written by save_pretrained")
    gated = (" (gated: accept its licence on huggingface.co and log in with `hf auth login` first)"
             if ident in GATED else "")
    return (
        f"teacher '{name}' (hub id {ident}) is not available offline: looked for a local directory '{ident}' and in "
        f"the Hugging Face cache {hf_cache_dir()} ({detail}). Download it once on a machine with network with "
        f"`hf download {ident}`{gated} (set HF_HOME to share the cache), or pass a local directory that holds "
        f"config.json and model.safetensors"
    )


def load_hf_vision_model(name: str, dtype: torch.dtype = torch.float32):
    """A DINOv2 / DINOv2-with-registers / DINOv3 ViT from a short name, hub id or local directory."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ident = resolve_teacher(name)
    try:
        return AutoModel.from_pretrained(ident, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as local_error:
        if Path(ident).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise PrxError(_missing_teacher_message(name, ident, str(local_error).splitlines()[0][:120])) from None
    try:  # not cached: one download attempt (a machine with network and, for gated models, a token)
        return AutoModel.from_pretrained(ident, dtype=dtype)
    except (OSError, ValueError) as e:
        raise PrxError(_missing_teacher_message(name, ident, str(e).splitlines()[0][:120])) from None


def aspect_grid(height: int, width: int, tokens: int) -> tuple[int, int]:
    """A patch grid (rows, columns) of about ``tokens`` patches with the aspect ratio of a height×width image."""
    rows = max(1, round(math.sqrt(tokens * height / width)))
    return rows, max(1, round(tokens / rows))


class VisionTeacher(nn.Module):
    """Patch-token features of a frozen ViT (CLS and register tokens dropped).

    Inputs are images in [-1, 1]; they are resized to the requested patch grid, mapped to [0, 1]
    and ImageNet-normalised here, in torch, so gradients can flow through when wanted.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.hidden_dim = int(cfg.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @classmethod
    def load(cls, name: str, dtype: torch.dtype = torch.float32) -> "VisionTeacher":
        return cls(load_hf_vision_model(name, dtype))

    def train(self, mode: bool = True) -> "VisionTeacher":
        # Always eval: DINOv3 jitters its RoPE coordinates in training mode.
        return super().train(False)

    def forward(self, images: Tensor, grid: tuple[int, int], mode: str = "bilinear") -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, grid_h·grid_w, hidden) patch tokens on a grid_h × grid_w grid."""
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        x = (images.float() + 1) / 2
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode=mode, align_corners=False if mode != "nearest" else None,
                              antialias=mode in ("bilinear", "bicubic"))
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        hidden = self.model(pixel_values=x).last_hidden_state
        return hidden[:, self.num_prefix_tokens:]
