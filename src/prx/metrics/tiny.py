"""Random stand-ins for the metrics' feature extractors: every metric runs offline in tests.

Like the teachers' stand-ins (:mod:`prx.stand_ins`), they are written once under ``$PRX_CACHE`` (default
``~/.cache/prx``) and then loaded through the very same code as real weights; their numbers
mean nothing.

- ``tiny-random-clip``: a toy CLIPModel (text and vision towers, 56 px input) with a byte-level
  CLIP tokenizer, in a ``save_pretrained`` directory;
- ``tiny-random-dinov2``: the tiny DINOv2 teacher of :mod:`prx.teachers`;
- ``random-inception``: the FID Inception at full size with random (He-initialised) weights, as a
  ``.pth`` file laid out like ``pt_inception-2015-12-05-6726825d.pth``.

(:func:`prx.metrics.extractors.full_size_random` builds the real extractors' architectures with random weights in
memory, for benchmarks.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from prx.files import cache_root
from prx.metrics.inception import random_inception
from prx.stand_ins import save_pretrained, stand_in_path, write_atomically

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


def _byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
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
