"""Random stand-ins for the metrics' feature extractors: every metric runs offline in tests.

Like the teachers' stand-ins (:mod:`prx.teachers`), they are written once under ``$PRX_CACHE`` (default
``~/.cache/prx``) and then loaded through the very same code as real weights; their numbers
mean nothing.

- ``tiny-random-clip``: a toy CLIPModel (text and vision towers, 56 px input) with a byte-level
  CLIP tokenizer, in a ``save_pretrained`` directory;
- ``tiny-random-dinov2``: the tiny DINOv2 teacher of :mod:`prx.teachers`;
- ``random-inception``: the FID Inception at full size with random (He-initialised) weights, as a
  ``.pth`` file laid out like ``pt_inception-2015-12-05-6726825d.pth``.

:func:`full_size_random` builds the real extractors' architectures (Inception-v3, CLIP
ViT-L/14-336, DINOv2 ViT-L/14) with random weights in memory, for benchmarks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from prx.runtime import cache_root
from prx.teachers import save_pretrained, stand_in_path, write_atomically

NAMES = ("tiny-random-clip", "tiny-random-dinov2", "random-inception")


def cache_dir() -> Path:
    return cache_root() / "tiny-extractors"


def tiny_extractor_path(name: str) -> Path:
    """Create (once) and return the local path of a random stand-in."""
    if name == "tiny-random-dinov2":
        return stand_in_path(name)
    if name not in NAMES:
        raise ValueError(f"unknown stand-in '{name}': one of {', '.join(NAMES)}")
    path = cache_dir() / (name + (".pth" if name == "random-inception" else ""))
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, and the caller's RNG untouched
        torch.manual_seed(0)
        write_atomically(path, lambda tmp: _create(name, tmp))  # ranks creating it at once keep one copy
    return path


def _create(name: str, path: Path) -> None:
    if name == "random-inception":
        torch.save(random_inception().state_dict(), path)
        return
    model, tokenizer = tiny_clip()
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)


def random_inception() -> nn.Module:
    """The FID Inception with He-initialised convolutions and identity batch norms: activations keep
    their scale through the 94 layers (so the features are neither 0 nor huge)."""
    from prx.metrics.inception import FIDInceptionV3

    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
    return net


def _byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_clip():
    """A toy CLIPModel and a CLIP tokenizer over single bytes (no merges)."""
    import transformers as tf

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = tf.CLIPTokenizer(vocab=vocab, merges=[])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = tf.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, projection_dim=16),
        projection_dim=16)
    return tf.CLIPModel(config), tokenizer


def full_size_random(kind: str):
    """An extractor with the real architecture and random weights, built in memory (no file)."""
    from prx.metrics.extractors import ClipExtractor, DinoV2Extractor, InceptionExtractor

    if kind == "inception":
        return InceptionExtractor(net=random_inception())
    import transformers as tf

    if kind == "clip":  # openai/clip-vit-large-patch14-336
        config = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                     hidden_act="quick_gelu")
        return ClipExtractor(model=tf.CLIPVisionModelWithProjection(config), name="random ViT-L/14-336")
    if kind == "dinov2":  # facebook/dinov2-large
        config = tf.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                                 patch_size=14, image_size=518)
        return DinoV2Extractor(model=tf.Dinov2Model(config), name="random DINOv2 ViT-L/14")
    raise ValueError(f"unknown extractor kind '{kind}': inception, clip or dinov2")
