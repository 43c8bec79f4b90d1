"""``model.init_from``: a released diffusers PRX pixel pipeline (or its ``transformer/`` directory) as the start
of a run. Reads only its JSON configs, so a config that names one resolves without loading any weights: the
shape fields a config does not set come from the checkpoint's ``config.json`` (a field it sets must agree).
:mod:`prx.diffusers_io` loads the weights."""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

from prx.config.model import ModelConfig
from prx.config.rules import coerce
from prx.errors import ConfigError, PrxError

TRANSFORMER_CLASS = "PRXTransformer2DModel"
PIPELINE_CLASS = "PRXPixelPipeline"
DIFFUSERS_NORM_EPS = 1e-6  # PRXTransformer2DModel's LayerNorm eps (fixed, not a config field)
# prx model fields a diffusers config decides (text_dim aside: it comes from the text encoder)
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


def find_transformer_dir(path: str | Path) -> Path:
    """The PRXTransformer2DModel directory of ``path``: itself (a transformer/ directory) or path/transformer."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise PrxError(f"model.init_from '{path}' does not exist: give a diffusers PRX pixel pipeline directory "
                       f"or its transformer/ directory (resuming a run? `prx train RUN/config.yaml "
                       f"model.init_from=null`: a resume never reads it)")
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


def fill_model_config(model: dict) -> dict:
    """The ``model:`` section of a new config with ``init_from`` set: shape fields it does not set come from
    the diffusers checkpoint; those it sets must agree (else a one-line error naming the key and both values)."""
    path = model["init_from"]
    directory, config = read_transformer_config(path)
    theirs = model_config_from_diffusers(config, directory)
    theirs.pop("text_dim")  # the run's text encoder decides it; load_init_weights checks that they agree
    out = dict(model)
    for key in SHAPE_FIELDS:
        if key in model:
            mine = _coerce_field(key, model[key])
            if mine != theirs[key]:
                raise ConfigError(f"model.{key}={mine} but model.init_from '{path}' has {key}={theirs[key]}: "
                                  f"drop model.{key} to take the checkpoint's, or start from another checkpoint")
        out[key] = theirs[key]
    return out


def fill_from_pretrained(data: dict) -> dict:
    """A plain config dict with the fields ``model.init_from`` decides filled in (unchanged without it)."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return data
    return {**data, "model": fill_model_config(model)}
