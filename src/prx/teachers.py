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
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx.errors import PrxError
from prx.runtime import cache_root

TEACHER_IDS = {
    "dinov2": "facebook/dinov2-with-registers-base",
    "dinov3": "facebook/dinov3-vitl16-pretrain-lvd1689m",
}
GATED = {"facebook/dinov3-vitl16-pretrain-lvd1689m"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Shapes (transformers config fields) of the named teachers and the stand-ins, so a plan or a FLOP
# count needs no weights and creates nothing.
TEACHER_SHAPES = {
    TEACHER_IDS["dinov3"]: dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                patch_size=16, num_register_tokens=4),
    TEACHER_IDS["dinov2"]: dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12,
                                patch_size=14, num_register_tokens=4),
}
STAND_INS = {  # name → (architecture, shape)
    "tiny-random-dinov2": ("dinov2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                          patch_size=14, image_size=224, num_register_tokens=4)),
    "tiny-random-dinov3": ("dinov3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, patch_size=16, num_register_tokens=4)),
    "random-dinov2-base": ("dinov2", TEACHER_SHAPES[TEACHER_IDS["dinov2"]]),
    "random-dinov3-vitl16": ("dinov3", TEACHER_SHAPES[TEACHER_IDS["dinov3"]]),
    "tiny-random-vgg16": ("vgg16", {}),
}


def teacher_shape(name: str) -> SimpleNamespace | None:
    """The shape of a named teacher or stand-in without loading (or creating) it; None if unknown."""
    if name in STAND_INS:
        return SimpleNamespace(**STAND_INS[name][1])
    ident = TEACHER_IDS.get(name, os.path.expanduser(name))
    if ident in TEACHER_SHAPES:
        return SimpleNamespace(**TEACHER_SHAPES[ident])
    try:  # a local directory or a hub id in the cache: its config.json
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(ident, local_files_only=True)
    except Exception:
        return None


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
    gated = " (gated: accept its licence on huggingface.co and log in with `hf auth login` first)" if ident in GATED else ""
    return (
        f"teacher '{name}' (hub id {ident}) is not available offline: looked for a local directory '{ident}' and in the "
        f"Hugging Face cache {hf_cache_dir()} ({detail}). Download it once on a machine with network with "
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


# --------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------


def stand_in_path(name: str) -> Path:
    """Create (once) and return the local path of a random stand-in teacher."""
    if name not in STAND_INS:
        raise ValueError(f"unknown stand-in teacher '{name}': one of {', '.join(STAND_INS)}")
    path = cache_root() / "tiny-teachers" / (name + (".pth" if name.endswith("vgg16") else ""))
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, and the caller's RNG untouched
        torch.manual_seed(0)
        write_atomically(path, lambda tmp: _create_stand_in(name, tmp))
    return path


def _create_stand_in(name: str, path: Path) -> None:
    architecture, shape = STAND_INS[name]
    if architecture == "vgg16":
        from prx.lpips import vgg16_features

        torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, path)
        return
    import transformers as tf

    if architecture == "dinov2":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**shape))
    else:
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**shape))
    save_pretrained(model, path)


def save_pretrained(model, directory: Path) -> None:
    """What transformers' ``save_pretrained`` writes (config.json, model.safetensors), from every
    process: under a running torch.distributed job its own method writes on rank 0 only."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def write_atomically(path: Path, write) -> None:
    """Write to a private temporary name, then rename into place; when another process (a rank of
    the same job) got there first, keep its copy: both are the same weights."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
