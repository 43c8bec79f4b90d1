"""``model.init_from``: a diffusers PRX pixel pipeline (or its ``transformer/`` directory) as the start of a run.

Reads only the pipeline's JSON files, so a config that names one resolves without loading any weights. A config
that sets ``model.init_from`` is a fine-tune: the keys it does not set come from the built-in ``finetune`` config
(not the from-scratch recipe's defaults), then each field the pipeline decides fills the keys still unset, one
function per field in :data:`PIPELINE_FIELDS` (a key the config sets stays; the model's shape must agree):

    transformer/config.json          → model.* shape (patch, widths, depth, heads, resolution_embeds, ...)
    text_encoder/ + tokenizer/       → text.encoder (the pipeline directory itself, see :func:`pipeline_text_parts`;
                                       the text encoder's class is the one model_index.json names, prx.text)
    model_index.json prompt_max_tokens → text.max_length
    PRXPixelPipeline.encode_prompt   → text.clean: prx_pixel, text.pad_to_max_length: true
    model_index.json noise_scale     → objective.noise_scale
    model_index.json default_sample_size → data.resolution
    scheduler/ shift                 → objective.shift (and so sampling.shift, when unset)
    the depth                        → repa.block (the recipe's block 8 of 24: a third of the depth)

``model.init_from`` is a directory, or a hub id whose snapshot is in the local Hugging Face cache (``hf download
ID`` once; nothing is downloaded during a run). :mod:`prx.diffusers_io` loads the weights."""

from __future__ import annotations

import copy
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prx.config.model import ModelConfig
from prx.config.parse import BUILTIN_CONFIG_DIR, read_yaml
from prx.config.rules import coerce
from prx.errors import ConfigError, PrxError
from prx.hub import cached_snapshot

TRANSFORMER_CLASS = "PRXTransformer2DModel"
PIPELINE_CLASS = "PRXPixelPipeline"
DIFFUSERS_NORM_EPS = 1e-6  # PRXTransformer2DModel's LayerNorm eps (fixed, not a config field)
# prx model fields a diffusers config decides (text_dim aside: it comes from the text encoder)
# PRXPixelPipeline's own defaults, which diffusers uses when model_index.json leaves a field out
PIPELINE_DEFAULTS = {"default_sample_size": 1024, "prompt_max_tokens": 256, "noise_scale": 2.0}
REQUIRED = "???"  # a config's value that the command line must give (OmegaConf's mark for a missing value)
FINETUNE_CONFIG = "finetune"  # the built-in config whose values a fine-tune's unset keys take
SHAPE_FIELDS = ("patch_size", "bottleneck_dim", "hidden_dim", "num_layers", "num_heads", "mlp_ratio", "rope_theta",
                "resolution_embeds", "norm_eps")


def mlp_width_diffusers(hidden: int, ratio: float) -> int:
    return int(hidden * ratio)


def model_config_from_diffusers(config: dict, where: str | Path = "the checkpoint") -> dict:
    """prx model fields (SHAPE_FIELDS plus text_dim) of a PRXTransformer2DModel config; one-line errors for
    checkpoints prx's PRX cannot hold."""

    defaults = {"in_channels": 16, "patch_size": 2, "context_in_dim": 2304, "hidden_size": 1792, "mlp_ratio": 3.5,
                "num_heads": 28, "depth": 16, "axes_dim": [32, 32], "theta": 10000, "time_factor": 1000.0,
                "time_max_period": 10000, "bottleneck_size": None, "resolution_embeds": False}  # diffusers' defaults
    c = {k: config.get(k, v) for k, v in defaults.items()}
    if c["in_channels"] != 3:
        raise PrxError(f"{where} is a latent-space PRX (in_channels={c['in_channels']}): prx trains pixel-space "
                       f"models (in_channels=3), start from a PRX pixel checkpoint")
    if c["bottleneck_size"] is None:
        raise PrxError(f"{where} has no bottleneck_size (a single Linear img_in): prx's PRX always embeds patches "
                       f"through a linear bottleneck, start from a PRX pixel checkpoint")
    hidden, heads = int(c["hidden_size"]), int(c["num_heads"])
    if hidden % heads:
        raise PrxError(f"{where}: hidden_size={hidden} is not divisible by num_heads={heads}")
    head_dim = hidden // heads
    if list(c["axes_dim"]) != [head_dim // 2, head_dim // 2]:
        raise PrxError(f"{where} has axes_dim={list(c['axes_dim'])}: prx's 2D RoPE splits each head in two halves, "
                       f"axes_dim=[{head_dim // 2}, {head_dim // 2}]")
    for key, value in (("time_factor", 1000.0), ("time_max_period", 10000)):
        if float(c[key]) != value:
            raise PrxError(f"{where} has {key}={c[key]}: prx's PRX embeds timesteps with {key}={value}")
    ours = int(round(hidden * float(c["mlp_ratio"])))
    if ours != mlp_width_diffusers(hidden, float(c["mlp_ratio"])):
        raise PrxError(f"{where} has mlp_ratio={c['mlp_ratio']}, whose GeGLU width rounds differently in prx")
    return {
        "patch_size": int(c["patch_size"]),
        "bottleneck_dim": int(c["bottleneck_size"]),
        "hidden_dim": hidden,
        "num_layers": int(c["depth"]),
        "num_heads": heads,
        "mlp_ratio": float(c["mlp_ratio"]),
        "rope_theta": float(c["theta"]),
        "resolution_embeds": bool(c["resolution_embeds"]),
        "norm_eps": DIFFUSERS_NORM_EPS,
        "text_dim": int(c["context_in_dim"]),
    }


def _is_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def locate(path: str | Path) -> Path:
    """The local directory ``model.init_from`` names: the path itself, or a hub id's snapshot in the local Hugging
    Face cache (a one-line error saying how to download it otherwise)."""
    local = Path(os.path.expanduser(str(path)))
    if local.exists() or not _is_hub_id(str(path)):
        return local
    snapshot = cached_snapshot(str(path), "model_index.json") or cached_snapshot(str(path), "config.json")
    if snapshot is None:
        raise PrxError(f"model.init_from '{path}' is neither a local directory nor a pipeline in the Hugging Face "
                       f"cache: download it once with `hf download {path}` (then it is found offline), or give its "
                       f"directory")
    return snapshot


def find_transformer_dir(path: str | Path) -> Path:
    """The PRXTransformer2DModel directory of ``path`` (a directory or a cached hub id): itself (a transformer/
    directory) or path/transformer."""
    path = locate(path)
    if not path.exists():
        raise PrxError(f"model.init_from '{path}' does not exist: give a diffusers PRX pixel pipeline directory "
                       f"or its transformer/ directory (resuming a run? `prx train RUN/config.yaml "
                       f"model.init_from=null`: a resume never reads it)")
    if not path.is_dir():
        raise PrxError(f"model.init_from '{path}' is a file: give a diffusers PRX pixel pipeline directory "
                       f"(model_index.json, transformer/, text_encoder/, tokenizer/) or its hub id")
    for candidate in (path, path / "transformer"):
        config_file = candidate / "config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as e:
                raise PrxError(f"{config_file} is not readable JSON ({e})") from None
            name = config.get("_class_name") if isinstance(config, dict) else None
            if name != TRANSFORMER_CLASS:
                if candidate == path and (path / "transformer").is_dir():
                    continue
                raise PrxError(f"{config_file} describes a {name or 'model of unknown class'}, not a "
                               f"{TRANSFORMER_CLASS}: give a diffusers PRX pixel checkpoint")
            return candidate
    raise PrxError(f"'{path}' is not a diffusers checkpoint: found neither {path / 'config.json'} (a transformer/ "
                   f"directory) nor {path / 'transformer' / 'config.json'} (a pipeline directory)")


def read_transformer_config(path: str | Path) -> tuple[Path, dict]:
    directory = find_transformer_dir(path)
    return directory, json.loads((directory / "config.json").read_text())


def _coerce_field(key: str, value):
    return coerce(value, typing.get_type_hints(ModelConfig)[key], f"model.{key}")


@dataclass(frozen=True)
class PretrainedPipeline:
    """What ``model.init_from`` names, as JSON: the transformer's config and, for a whole pipeline directory, its
    ``model_index.json`` and scheduler config (empty for a bare ``transformer/``)."""

    path: str  # as the config gives it
    transformer_dir: Path
    transformer: dict
    index: dict
    scheduler: dict

    @property
    def root(self) -> Path | None:
        """The pipeline directory (None for a bare transformer/ directory)."""
        return self.transformer_dir.parent if self.index else None

    def value(self, key: str):
        """A ``model_index.json`` field, or PRXPixelPipeline's default for it (None without a pipeline)."""
        return self.index.get(key, PIPELINE_DEFAULTS.get(key)) if self.index else None


def read_pipeline(path: str) -> PretrainedPipeline:
    directory, transformer = read_transformer_config(path)
    root = directory.parent
    index = _read_json(root / "model_index.json") if directory.name == "transformer" else {}
    if index.get("_class_name") not in (None, PIPELINE_CLASS):  # another pipeline around a PRX transformer
        index = {}
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json") if index else {}
    return PretrainedPipeline(str(path), directory, transformer, index, scheduler)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PrxError(f"{path} is not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def pipeline_text_parts(path: str | Path) -> tuple[str, str]:
    """(encoder, tokenizer) directories of a text encoder path: a diffusers pipeline directory's ``text_encoder/`` and
    ``tokenizer/``; anything else is both (a hub id, or a directory that holds the encoder and its tokenizer)."""
    root = Path(os.path.expanduser(str(path)))
    if (root / "model_index.json").is_file() and (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
        return str(root / "text_encoder"), str(root / "tokenizer")
    return str(path), str(path)


def _is_set(data: dict, key: str) -> bool:
    """Does the config give ``key`` (section.name), even as null? (A run's saved config gives every key.)"""
    section, _, name = key.partition(".")
    return isinstance(data.get(section), dict) and name in data[section]


def _fill(data: dict, key: str, value) -> None:
    """``key`` (section.name) takes ``value`` when the config does not give it and the pipeline has one."""
    section, _, name = key.partition(".")
    if value is not None and not _is_set(data, key):
        data[section] = {**(data.get(section) or {}), name: value}


def fill_model(data: dict, pipe: PretrainedPipeline) -> None:
    """The ``model:`` shape fields the config does not set come from the transformer's config.json; those it sets
    must agree (else a one-line error naming the key and both values)."""
    model = data["model"]
    theirs = model_config_from_diffusers(pipe.transformer, pipe.transformer_dir)
    theirs.pop("text_dim")  # the run's text encoder decides it; load_init_weights checks that they agree
    out = dict(model)
    for key in SHAPE_FIELDS:
        if key in model:
            mine = _coerce_field(key, model[key])
            if mine != theirs[key]:
                raise ConfigError(f"model.{key}={mine} but model.init_from '{pipe.path}' has {key}={theirs[key]}: "
                                  f"drop model.{key} to take the checkpoint's, or start from another checkpoint")
        out[key] = theirs[key]
    data["model"] = out


def fill_text(data: dict, pipe: PretrainedPipeline) -> None:
    """The pipeline's text encoder (its ``text_encoder/`` and ``tokenizer/``, loaded as ``text.encoder: DIR``, whole:
    an export saves it already cut to the run's ``text.num_layers``) and its prompt length."""
    root = pipe.root
    if _encodes_prompts(pipe):  # (a hub id's pipeline: its snapshot directory in the cache)
        _fill(data, "text.encoder", pipe.path if Path(pipe.path) == root else str(root))
    _fill(data, "text.max_length", pipe.value("prompt_max_tokens"))


def _encodes_prompts(pipe: PretrainedPipeline) -> bool:
    """Whether the pipeline has a text encoder of its own, which PRXPixelPipeline.encode_prompt runs."""
    return pipe.root is not None and pipeline_text_parts(pipe.root)[0] != str(pipe.root)


def fill_text_clean(data: dict, pipe: PretrainedPipeline) -> None:
    """PRXPixelPipeline cleans every prompt before tokenising it (``ftfy.fix_text``, HTML unescaped twice, surrounding
    spaces stripped): training reads captions as inference will read prompts."""
    _fill(data, "text.clean", "prx_pixel" if _encodes_prompts(pipe) else None)


def fill_text_padding(data: dict, pipe: PretrainedPipeline) -> None:
    """PRXPixelPipeline pads every prompt to ``prompt_max_tokens`` before its text encoder: the real tokens'
    embeddings are then computed at inference's shapes (a causal encoder such as Qwen3-VL's, left-padded, sees other
    positions otherwise)."""
    _fill(data, "text.pad_to_max_length", True if _encodes_prompts(pipe) else None)


def fill_noise_scale(data: dict, pipe: PretrainedPipeline) -> None:
    _fill(data, "objective.noise_scale", pipe.value("noise_scale"))


def fill_resolution(data: dict, pipe: PretrainedPipeline) -> None:
    _fill(data, "data.resolution", pipe.value("default_sample_size"))


def fill_shift(data: dict, pipe: PretrainedPipeline) -> None:
    """The scheduler's shift as the timestep shift (a prx export writes the run's sampling shift, by default its
    training shift): the fine-tune trains on the noise levels the model learnt, and samples as the pipeline does."""
    _fill(data, "objective.shift", pipe.scheduler.get("shift"))


def fill_repa_block(data: dict, pipe: PretrainedPipeline) -> None:
    """REPA's block at the recipe's depth, a third of the model's (block 8 of 24), within a model of any depth."""
    depth = int(pipe.transformer.get("depth", 16))
    _fill(data, "repa.block", max(1, round(depth / 3)))


# what a pipeline decides, one function per field, in order: each fills the config keys still unset
PIPELINE_FIELDS: tuple[Callable[[dict, PretrainedPipeline], None], ...] = (
    fill_model, fill_text, fill_text_clean, fill_text_padding, fill_noise_scale, fill_resolution, fill_shift,
    fill_repa_block)


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections merge key by key, any other value of ``over`` replaces base's."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def finetune_defaults(data: dict) -> dict:
    """A fine-tune's config: the keys it does not set take the built-in finetune config's values."""
    base: dict[str, Any] = read_yaml(BUILTIN_CONFIG_DIR / f"{FINETUNE_CONFIG}.yaml")
    return _merged(base, data)


def fill_from_pretrained(data: dict) -> dict:
    """A plain config dict with what ``model.init_from`` decides filled in (unchanged without it): the finetune
    config's values for the keys it does not set, then the pipeline's fields (:data:`PIPELINE_FIELDS`)."""
    model = data.get("model")
    init = model.get("init_from") if isinstance(model, dict) else None
    if init == REQUIRED:
        raise ConfigError("model.init_from is required by this config: pass model.init_from=DIR, a diffusers PRX "
                          "pixel pipeline directory (`prx export --format diffusers` writes one) or its transformer/")
    if not init:
        return data
    data = finetune_defaults(data)
    pipe = read_pipeline(str(init))
    for fill in PIPELINE_FIELDS:
        fill(data, pipe)
    return data
