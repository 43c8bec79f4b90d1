"""Stand-ins: random networks of a named shape, written once under ``$PRX_CACHE`` and then loaded through the very
same code as the real weights (tests, benchmarks, machines without a network). They teach the model nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import save_file

from prx.files import cache_root
from prx.lpips import vgg16_features
from prx.teacher_shapes import STAND_INS


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
        torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, path)
        return
    if architecture == "dinov2":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**shape))
    else:
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**shape))
    save_pretrained(model, path)


def save_pretrained(model, directory: Path) -> None:
    """What transformers' ``save_pretrained`` writes (config.json, model.safetensors), from every
    process: under a running torch.distributed job its own method writes on rank 0 only."""
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


def resolve_vgg_weights(name: str | None) -> str | None:
    """``perceptual.lpips_vgg_weights``: a stand-in's name → its file (a random trunk, full size); else as given."""
    return str(stand_in_path("tiny-random-vgg16")) if name in ("tiny-random-vgg16", "random-vgg16") else name
