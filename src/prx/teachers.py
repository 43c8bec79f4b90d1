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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx import hub
from prx.stand_ins import stand_in_path
from prx.teacher_shapes import GATED, IMAGENET_MEAN, IMAGENET_STD, STAND_INS, TEACHER_IDS, TEACHER_SHAPES, teacher_shape  # noqa: F401


def resolve_teacher(name: str) -> str:
    """Short name → hub id; a stand-in → its local directory; a local directory or hub id as given."""
    if name in STAND_INS:
        return str(stand_in_path(name))
    return TEACHER_IDS.get(name, os.path.expanduser(name))


def hf_cache_dir() -> str:
    return hub.cache_dir()


def load_hf_vision_model(name: str, dtype: torch.dtype = torch.float32, option: str = "repa.teacher"):
    """A DINOv2 / DINOv2-with-registers / DINOv3 ViT from a short name, hub id or local directory (:func:`prx.hub.load`:
    the directory or the cache first, no code from its files, one line when it is missing)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    ident = resolve_teacher(name)
    return hub.load(lambda source, local: AutoModel.from_pretrained(source, dtype=dtype, local_files_only=local,
                                                                    trust_remote_code=False),
                    name, ident, "teacher", f"{option}=DIR", gated=ident in GATED)


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
    def load(cls, name: str, dtype: torch.dtype = torch.float32, option: str = "repa.teacher") -> "VisionTeacher":
        return cls(load_hf_vision_model(name, dtype, option))

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
