"""Tiny random teachers for smoke tests and ``configs/speedrun-tiny.yaml``.

The real teachers cannot be downloaded on an offline machine. These stand-ins have the same
architectures at toy sizes and random weights; they are written to a local directory once
(``$PRX_CACHE``, default ``~/.cache/prx``) with ``save_pretrained`` / ``torch.save`` and then
loaded by the very same code paths as real weights. They exercise the plumbing; they teach the
model nothing.

Names: ``tiny-random-dinov2``, ``tiny-random-dinov3`` (teachers), ``tiny-random-vgg16`` (LPIPS trunk).
``random-dinov2-base`` and ``random-dinov3-vitl16`` are the real teachers' architectures at full
size with random weights: the same FLOPs, for benchmarking (``prx bench``) where no weights are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from prx.runtime import cache_root

TINY_NAMES = ("tiny-random-dinov2", "tiny-random-dinov3", "tiny-random-vgg16", "random-dinov2-base",
              "random-dinov3-vitl16")


def cache_dir() -> Path:
    return cache_root() / "tiny-teachers"


def _write_atomically(path: Path, write) -> None:
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


def tiny_teacher_path(name: str) -> Path:
    """Create (once) and return the local path of a tiny random teacher."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny teacher '{name}': one of {', '.join(TINY_NAMES)}")
    path = cache_dir() / (name + (".pth" if name.endswith("vgg16") else ""))
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, and the caller's RNG untouched
        torch.manual_seed(0)
        _create(name, path)
    return path


def _create(name: str, path: Path) -> None:
    if name == "tiny-random-vgg16":
        from prx.perceptual import vgg16_features

        features = vgg16_features()
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
        _write_atomically(path, lambda p: torch.save(state, p))
        return
    import transformers as tf

    if name.startswith("random-"):
        from prx.plan import KNOWN_VISION
        from prx.teachers import TEACHER_IDS

        shape = dict(KNOWN_VISION[TEACHER_IDS["dinov2" if "dinov2" in name else "dinov3"]])
        if "dinov2" in name:
            model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_attention_heads=12, **shape))
        else:
            model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(num_attention_heads=16, **shape))
    elif name == "tiny-random-dinov2":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224,
            num_register_tokens=4))
    else:
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
            num_register_tokens=4))
    _write_atomically(path, lambda p: _save_pretrained(model, p))


def _save_pretrained(model, directory: Path) -> None:
    """What ``save_pretrained`` writes (config.json, model.safetensors), from every process: under a
    running torch.distributed job transformers' own method writes on rank 0 only."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
