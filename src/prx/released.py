"""A released PRX pixel model (diffusers' ``PRXPixelPipeline`` directory, e.g. ``Photoroom/prxpixel-t2i``) as
the start of a fine-tune: where its parts are, and the run settings that make training see what the pipeline's
inference sees.

The pipeline (diffusers 0.42.1, ``pipeline_prx_pixel.py``) encodes a prompt by

1. cleaning it: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip`` (no chat template);
2. tokenising it with ``padding="max_length"``, ``max_length=prompt_max_tokens`` (256), ``truncation=True``,
   with the attention mask;
3. running its text encoder (``text_encoder/``, the class ``model_index.json`` names: the Qwen3-VL text
   backbone ``Qwen3VLTextModel`` for PRXPixel) and taking ``last_hidden_state``; the transformer gets the
   embeddings with the mask as ``attention_mask`` (masked tokens never reach the image tokens).

prx's :class:`~prx.text.TextEncoder` does the same with ``text.clean=prx_pixel`` and
``text.pad_to_max_length=true`` (:meth:`ReleasedPipeline.config_overrides` sets them); it then keeps each
caption's real tokens, which are the tokens the pipeline's mask lets through. Sampling starts from
``randn · noise_scale`` (2.0 for PRXPixel), prx's ``objective.noise_scale``.

Nothing here imports diffusers: the directory is read as diffusers writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from prx.config.pretrained import PIPELINE_CLASS, model_config_from_diffusers, read_transformer_config
from prx.errors import PrxError

# PRXPixelPipeline.__init__'s defaults, for a model_index.json that leaves a setting out
PIPELINE_DEFAULTS = {"default_sample_size": 1024, "prompt_max_tokens": 256, "noise_scale": 2.0}


@dataclass(frozen=True)
class ReleasedPipeline:
    """What a ``PRXPixelPipeline`` directory holds, read without loading any weights."""

    root: Path
    transformer_dir: Path
    text_encoder_dir: Path
    tokenizer_dir: Path
    text_encoder_class: str  # the transformers class model_index.json names (Qwen3VLTextModel for PRXPixel)
    tokenizer_class: str
    noise_scale: float  # initial noise randn · noise_scale
    default_sample_size: int  # the pipeline's default height and width, pixels
    prompt_max_tokens: int  # every prompt is padded / truncated to this many tokens
    resolution_embeds: bool  # the transformer adds an embedding of (height, width) to its timestep vector
    sampling_shift: float | None  # FlowMatchEulerDiscreteScheduler's shift, if the directory has a scheduler
    model_fields: dict = field(default_factory=dict)  # prx model.* fields of the transformer (shape, text_dim)

    def config_overrides(self) -> dict[str, object]:
        """The dotted config keys a fine-tune of this pipeline sets: its weights, its text encoding, its noise.

        ``model.*`` shape fields follow from ``model.init_from`` (prx.diffusers_io.fill_model_config).
        """
        overrides: dict[str, object] = {
            "model.init_from": str(self.root),
            "model.resolution_embeds": self.resolution_embeds,
            "objective.noise_scale": self.noise_scale,
            "text.encoder": str(self.text_encoder_dir),
            "text.tokenizer": str(self.tokenizer_dir),
            "text.max_length": self.prompt_max_tokens,
            "text.clean": "prx_pixel",
            "text.pad_to_max_length": True,
        }
        if self.sampling_shift is not None:
            overrides["sampling.shift"] = self.sampling_shift
        return overrides

    def model_config(self):
        """prx's model config of this pipeline's transformer (its shape and text width)."""
        from prx.config import ModelConfig

        return ModelConfig(**self.model_fields)

    def text_encoder(self, device="cpu", dtype="float32", **options):
        """A :class:`~prx.text.TextEncoder` that encodes prompts as this pipeline does."""
        from prx.text import TextEncoder

        settings = {"max_length": self.prompt_max_tokens, "tokenizer": str(self.tokenizer_dir), "clean": "prx_pixel",
                    "pad_to_max_length": True, **options}  # options may change any of them (e.g. to compare)
        return TextEncoder(str(self.text_encoder_dir), dtype=dtype, device=device, **settings)

    def describe(self) -> str:
        m = self.model_fields
        return (f"{PIPELINE_CLASS} at {self.root}: transformer {m.get('num_layers')} blocks, "
                f"hidden {m.get('hidden_dim')}, "
                f"patch {m.get('patch_size')}, bottleneck {m.get('bottleneck_dim')}, text width {m.get('text_dim')}; "
                f"text encoder {self.text_encoder_class} ({self.prompt_max_tokens} tokens); noise_scale "
                f"{self.noise_scale:g}; default {self.default_sample_size} px")


def locate_pipeline(source: str | Path) -> Path:
    """A pipeline directory: ``source`` itself, or a hub id's snapshot in the local Hugging Face cache."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        if not path.is_dir():
            raise PrxError(f"'{source}' is a file: give a {PIPELINE_CLASS} directory (model_index.json, transformer/, "
                           f"text_encoder/, tokenizer/) or its hub id")
        return path
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=str(source), local_files_only=True))
        except Exception:  # not in the cache (LocalEntryNotFoundError), or a malformed id
            raise PrxError(f"'{source}' is neither a local directory nor a pipeline in the Hugging Face cache: "
                           f"download it once with `hf download {source}` (then it is found offline), or give "
                           f"its directory") from None
    raise PrxError(f"'{source}' does not exist: give a {PIPELINE_CLASS} directory or its hub id")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrxError(f"{path.parent} has no {path.name}: {what}") from None
    except (OSError, ValueError) as e:
        raise PrxError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise PrxError(f"{path} is not a JSON object: {what}")
    return data


def _component(root: Path, index: dict, name: str) -> tuple[Path, str]:
    """A transformers component (text_encoder, tokenizer): its directory and the class the index names."""
    entry = index.get(name)
    directory = root / name
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)) or not directory.is_dir():
        raise PrxError(f"{root} has no {name}/ component (model_index.json: {entry!r}): a {PIPELINE_CLASS} directory "
                       f"holds transformer/, text_encoder/ and tokenizer/ (diffusers' save_pretrained writes them)")
    return directory, entry[1]


def read_pipeline(source: str | Path) -> ReleasedPipeline:
    """Read a ``PRXPixelPipeline`` directory (or a cached hub id); one-line errors for anything else."""
    root = locate_pipeline(source)
    index = _read_json(root / "model_index.json",
                       f"not a diffusers pipeline directory (a {PIPELINE_CLASS} has model_index.json)")
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        hint = (" (PRXPipeline is the latent-space PRX, with a VAE: prx fine-tunes pixel-space models)"
                if name == "PRXPipeline" else "")
        raise PrxError(f"{root} is a {name or 'pipeline of unknown class'}, not a {PIPELINE_CLASS}{hint}")
    transformer_dir, transformer_config = read_transformer_config(root)
    model_fields = model_config_from_diffusers(transformer_config, transformer_dir)  # refuses what prx cannot hold
    text_encoder_dir, text_encoder_class = _component(root, index, "text_encoder")
    tokenizer_dir, tokenizer_class = _component(root, index, "tokenizer")
    settings = {key: index.get(key, default) for key, default in PIPELINE_DEFAULTS.items()}
    settings = {key: default if value is None else value for (key, value), default in
                zip(settings.items(), PIPELINE_DEFAULTS.values())}  # null in model_index.json: the pipeline's default
    shift = None
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler = _read_json(scheduler_file, "")
        if not scheduler.get("use_dynamic_shifting", False):
            shift = float(scheduler.get("shift", 1.0))
    return ReleasedPipeline(
        root=root, transformer_dir=transformer_dir, text_encoder_dir=text_encoder_dir, tokenizer_dir=tokenizer_dir,
        text_encoder_class=text_encoder_class, tokenizer_class=tokenizer_class,
        noise_scale=float(settings["noise_scale"]), default_sample_size=int(settings["default_sample_size"]),
        prompt_max_tokens=int(settings["prompt_max_tokens"]), resolution_embeds=model_fields["resolution_embeds"],
        sampling_shift=shift, model_fields=model_fields,
    )


# The released PRXPixel transformer's shape (Photoroom/prxpixel-t2i, revision bcd5e63): not read from its config.json
# here (no download) but from a public port that loads its 282 weights (maxdiffusion's PRXPixel parity tools):
# PRXTransformer2DModel(in_channels=3, patch_size=16, context_in_dim=2048, hidden_size=3584, mlp_ratio=3.5,
# num_heads=28, depth=24, axes_dim=[64, 64]) with a 768 → 768 → 3584 bottleneck img_in and resolution_embeds: 6.98B
# parameters. Its text encoder is the Qwen3-VL-2B text backbone (hidden 2048, 28 layers, 16 heads, 8 KV heads, head
# 128, MLP 6144, vocabulary 151936; about 1.7B parameters, 3.4 GB in bf16).
PRXPIXEL_7B = dict(patch_size=16, bottleneck_dim=768, hidden_dim=3584, num_layers=24, num_heads=28, mlp_ratio=3.5,
                   rope_theta=10000.0, text_dim=2048, resolution_embeds=True, norm_eps=1e-6)
QWEN3_VL_2B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})


def prxpixel_7b_model_config():
    """prx's model config of the released 7B PRXPixel transformer (shape only: plans, benchmarks, meta tensors)."""
    from prx.config import ModelConfig

    return ModelConfig(**PRXPIXEL_7B)


def qwen3_vl_2b_text_config():
    """transformers' config of PRXPixel's text encoder (shape only)."""
    from transformers import Qwen3VLTextConfig

    return Qwen3VLTextConfig(**QWEN3_VL_2B_TEXT)
