"""REPA: representation alignment with a frozen vision teacher (Yu et al., ICLR 2025).

An MLP projector maps the denoiser's hidden state after block ``apply_at_block`` (counted from
1, as in the REPA paper: 8 = the output of the 8th block) to the teacher's feature width; the
loss is ``weight × (−cosine)`` averaged over tokens. The teacher sees the clean image, resized so
its patch grid equals the batch's token grid (12×21 for a 384×672 bucket at patch 32). With TREAD
on, the block's output holds only the visible tokens, and the teacher features are gathered at
the same indices, so only non-routed tokens are aligned. The projector trains (Adam group) but is
not part of the weights used for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prx.config.recipe import REPAConfig
from prx.model import gather_tokens
from prx.teachers import VisionTeacher


class REPAAlignment:
    """The REPA loss term: a trainable projector plus a frozen teacher, called as
    ``repa(hidden, clean_images, grid, hidden_index)``."""

    def __init__(self, teacher_name: str = "dinov3", loss_weight: float = 0.5, apply_at_block: int = 8,
                 projector_dim: int = 2048, resize_mode: str = "bilinear"):
        if apply_at_block < 1:
            raise ValueError(f"apply_at_block counts blocks from 1, got {apply_at_block}")
        self.config = REPAConfig(teacher_name, loss_weight, apply_at_block, projector_dim)
        self.resize_mode = resize_mode
        self.projector = None  # nn.Sequential, built by setup() once the teacher's width is known
        self.teacher = None

    @classmethod
    def from_config(cls, cfg: REPAConfig) -> "REPAAlignment | None":
        return cls(cfg.teacher, cfg.weight, cfg.block, cfg.projector_dim) if cfg.weight > 0 else None

    # the seed API's names for the config's fields
    @property
    def teacher_name(self) -> str:
        return self.config.teacher

    @property
    def loss_weight(self) -> float:
        return self.config.weight

    @property
    def apply_at_block(self) -> int:
        return self.config.block

    @property
    def projector_dim(self) -> int:
        return self.config.projector_dim

    @property
    def block_index(self) -> int:
        """0-based index of the block whose output is aligned."""
        return self.apply_at_block - 1

    def setup(self, model_dim: int, num_layers: int, teacher=None, dtype=None) -> "REPAAlignment":
        """Load the teacher and build the projector (before the optimizer is built)."""
        if self.apply_at_block > num_layers:
            raise ValueError(f"REPA apply_at_block={self.apply_at_block} but the model has {num_layers} blocks")
        if self.teacher is None:
            self.teacher = teacher or VisionTeacher.load(self.teacher_name, dtype)
        if self.projector is None:
            d = self.projector_dim
            self.projector = nn.Sequential(
                nn.Linear(model_dim, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, self.teacher.hidden_dim)
            )
        return self

    def to(self, device) -> "REPAAlignment":
        self.projector.to(device)
        self.teacher.to(device)
        return self

    def teacher_features(self, clean, grid: tuple[int, int]):
        with torch.no_grad():
            return self.teacher(clean, grid, mode=self.resize_mode)

    def __call__(self, hidden, clean, grid: tuple[int, int], hidden_index=None):
        """hidden (B, N or K, D) after the aligned block (``hidden_index`` (B, K): which tokens, when routed);
        clean (B, 3, H, W) in [-1, 1]; grid = the batch's token grid (rows, columns)."""
        target = self.teacher_features(clean, grid)  # (B, N, teacher_dim)
        if hidden_index is not None:
            target = gather_tokens(target, hidden_index)  # TREAD: align the visible tokens only
        pred = self.projector(hidden)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        return -self.loss_weight * cos.mean()
