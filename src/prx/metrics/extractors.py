"""Feature extractors of the quality metrics, loaded like prx's teachers.

CLIP and DINOv2 come through Hugging Face ``transformers`` from a hub id (found in the local
Hugging Face cache, so weights downloaded once need no network) or a local directory; the FID
Inception comes from its weights file (:mod:`prx.metrics.inception`). A missing model stops the
evaluation before any sampling, with one line that says what to download and where it goes.

Every extractor takes uint8 images (B, 3, H, W), resizes them to its input size with its own
fixed interpolation (the same for real and generated images), normalises them as its network
expects and returns float32 features (B, D). ``preprocessing`` says exactly what it did (it is
written into results.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx import hub
from prx.metrics import CLIP_ID, DINOV2_ID
from prx.metrics.inception import FEATURE_DIM, INPUT_SIZE, load_fid_inception, random_inception, resolve_weights
from prx.metrics.tiny import tiny_extractor_path
from prx.teachers import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit(images: Tensor) -> Tensor:
    """uint8 images → float32 in [0, 1] (float images are taken to be in [0, 1] already)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def resize_square(x: Tensor, size: int, mode: str, antialias: bool) -> Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 3, size, size); bicubic overshoot is clipped, as PIL does."""
    if x.shape[-2:] == (size, size):
        return x
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=antialias)
    return x.clamp(0, 1) if mode == "bicubic" else x


def resolve_extractor(name: str) -> str:
    """``tiny-random-*`` / ``random-*`` → its local directory; a directory or hub id as given."""
    if name.startswith(("tiny-random-", "random-")):
        return str(tiny_extractor_path(name))
    return os.path.expanduser(name)


def load_pretrained(cls, name: str, what: str, option: str, **kwargs):
    """``cls.from_pretrained`` from the local directory or the Hugging Face cache first, then one download attempt
    when the hub can be reached (:func:`prx.hub.load`: no code from the model's files); a failure is one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return hub.load(lambda source, local: cls.from_pretrained(source, local_files_only=local, trust_remote_code=False,
                                                              **kwargs),
                    name, resolve_extractor(name), what, f"{option} DIR")


class Extractor(nn.Module):
    """A frozen network: uint8 images (B, 3, H, W) → float32 features (B, dim)."""

    kind = "extractor"
    dim: int
    preprocessing: dict

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class InceptionExtractor(Extractor):
    """FID's Inception-v3 pool features (2048-d), preprocessed as pytorch-fid does."""

    kind = "inception"

    def __init__(self, weights: str | Path | None = None, net: nn.Module | None = None):
        super().__init__()
        if weights in ("random-inception", "tiny-random-inception"):  # a stand-in (tests)
            weights = tiny_extractor_path("random-inception")
        self.source = "in memory" if net is not None else str(resolve_weights(weights))
        self.net = net.requires_grad_(False).eval() if net is not None else load_fid_inception(weights)
        self.dim = FEATURE_DIM
        self.preprocessing = {"network": "FID Inception-v3 (pt_inception-2015-12-05)", "weights": self.source,
                              "size": INPUT_SIZE, "resize": "bilinear", "antialias": False, "scale": "[-1, 1]",
                              "feature": "pool3 (2048)"}
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(to_unit(images).to(self.device)).float()


class DinoV2Extractor(Extractor):
    """DINOv2 CLS features (the final layer-normed class token), images resized to 224×224 bicubic
    and ImageNet-normalised, as Stein et al. (2023) / dgm-eval compute FD-DINOv2."""

    kind = "dinov2"

    def __init__(self, name: str = DINOV2_ID, size: int = 224, model: nn.Module | None = None):
        super().__init__()
        from transformers import AutoModel

        self.source = name
        self.model = model if model is not None else load_pretrained(AutoModel, name, "DINOv2 model", "--dino-model",
                                                                      dtype=torch.float32)
        self.size = size
        self.dim = int(self.model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.preprocessing = {"network": name, "size": size, "resize": "bicubic", "antialias": True,
                              "normalise": "ImageNet", "feature": f"CLS token after the final layer norm ({self.dim})"}
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = resize_square(to_unit(images).to(self.device), self.size, "bicubic", antialias=True)
        hidden = self.model(pixel_values=(x - self.mean) / self.std).last_hidden_state
        return hidden[:, 0].float()


class ClipExtractor(Extractor):
    """CLIP image embeddings (the projected pooled output, ``image_embeds``), L2-normalised.

    Images are resized to the model's input size (336 for ViT-L/14-336) bicubic with antialias —
    what CLIP's processor (PIL) does to a square image — and CLIP-normalised. With ``text=True`` the
    full CLIPModel and its tokenizer are loaded and :meth:`encode_text` gives the text embeddings;
    otherwise only ``CLIPVisionModelWithProjection`` (the same image embeddings).
    """

    kind = "clip"

    def __init__(self, name: str = CLIP_ID, text: bool = False, model: nn.Module | None = None):
        super().__init__()
        import transformers as tf

        self.source = name
        self.has_text = text
        if model is not None:  # an in-memory CLIPVisionModelWithProjection (benchmarks)
            self.has_text = False
            self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
            vision_config = model.config
        elif text:
            model = load_pretrained(tf.CLIPModel, name, "CLIP model", "--clip-model", dtype=torch.float32)
            self.tokenizer = load_pretrained(tf.AutoTokenizer, name, "CLIP tokenizer", "--clip-model")
            self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
            self.text_model, self.text_projection = model.text_model, model.text_projection
            vision_config = model.config.vision_config
            self.max_text_length = int(model.config.text_config.max_position_embeddings)
        else:
            model = load_pretrained(tf.CLIPVisionModelWithProjection, name, "CLIP model", "--clip-model",
                                    dtype=torch.float32)
            self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
            vision_config = model.config
        self.size = int(vision_config.image_size)
        self.dim = int(self.visual_projection.out_features)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.preprocessing = {"network": name, "size": self.size, "resize": "bicubic", "antialias": True,
                              "normalise": "CLIP", "feature": f"image_embeds, L2-normalised ({self.dim})"}
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = resize_square(to_unit(images).to(self.device), self.size, "bicubic", antialias=True)
        pooled = self.vision_model(pixel_values=(x - self.mean) / self.std).pooler_output
        return F.normalize(self.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings (B, dim); prompts longer than CLIP's 77 tokens are truncated."""
        if not self.has_text:
            raise RuntimeError("this CLIP extractor was loaded without its text tower (text=False)")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_text_length,
                                return_tensors="pt").to(self.device)
        pooled = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return F.normalize(self.text_projection(pooled).float(), dim=-1)


def full_size_random(kind: str):
    """An extractor with the real architecture and random weights, built in memory (no file)."""
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
