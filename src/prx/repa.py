"""REPA: representation alignment with a frozen vision teacher (Yu et al., ICLR 2025).

An MLP projector maps the denoiser's hidden state after block ``apply_at_block`` (counted from
1, as in the REPA paper: 8 = the output of the 8th block) to the teacher's feature width; the
loss is ``weight × (−cosine)`` averaged over tokens. The teacher sees the clean image, resized so
its patch grid equals the denoiser's token grid. With TREAD on, the block's output holds only
the visible tokens, and the teacher features are gathered at the same indices, so only
non-routed tokens are aligned. The projector trains (Adam group) but is not part of the
weights used for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx.model import gather_tokens
from prx.teachers import VisionTeacher


class REPAAlignment(nn.Module):
    def __init__(self, teacher_name: str = "dinov3", loss_weight: float = 0.5, apply_at_block: int = 8,
                 projector_dim: int = 2048, resize_mode: str = "bilinear"):
        super().__init__()
        if apply_at_block < 1:
            raise ValueError(f"apply_at_block counts blocks from 1, got {apply_at_block}")
        self.teacher_name = teacher_name
        self.loss_weight = loss_weight
        self.apply_at_block = apply_at_block
        self.projector_dim = projector_dim
        self.resize_mode = resize_mode
        self.projector: nn.Sequential | None = None
        self.teacher: VisionTeacher | None = None

    @property
    def block_index(self) -> int:
        """0-based index of the block whose output is aligned."""
        return self.apply_at_block - 1

    def setup(self, model_dim: int, num_layers: int, teacher: VisionTeacher | None = None,
              dtype: torch.dtype = torch.float32) -> "REPAAlignment":
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

    @torch.no_grad()
    def teacher_features(self, clean: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.teacher(clean, grid, mode=self.resize_mode)

    def forward(self, hidden: Tensor, clean: Tensor, grid: tuple[int, int], hidden_index: Tensor | None = None) -> Tensor:
        """hidden (B, N or K, D) after the aligned block (``hidden_index`` (B, K): which tokens, when routed);
        clean (B, 3, H, W) in [-1, 1]; grid = the denoiser's token grid."""
        target = self.teacher_features(clean, grid)  # (B, N, teacher_dim)
        if hidden_index is not None:
            target = gather_tokens(target, hidden_index)  # TREAD: align the visible tokens only
        pred = self.projector(hidden)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        return -self.loss_weight * cos.mean()
