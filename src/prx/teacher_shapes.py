"""The vision teachers by name: hub ids, and the shapes of the named teachers and their random stand-ins, so a plan,
a FLOP count or a memory estimate needs no weights and creates nothing."""

from __future__ import annotations

import os
from types import SimpleNamespace

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

        return AutoConfig.from_pretrained(ident, local_files_only=True, trust_remote_code=False)
    except Exception:
        return None
