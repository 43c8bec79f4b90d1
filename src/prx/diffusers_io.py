"""prx ⇄ diffusers: a trained run as a ``PRXPixelPipeline`` directory, and a diffusers PRX pixel
checkpoint as the start of a new run.

prx's :class:`~prx.model.PRX` is diffusers' ``PRXTransformer2DModel`` with ``in_channels=3`` and
``bottleneck_size``: the same layers in the same order, renamed one to one, except the fused GeGLU
input ``mlp_in`` that diffusers keeps as two matrices ``gate_proj`` / ``up_proj``::

    prx                              diffusers
    img_in.{0,1}  txt_in             img_in.{0,1}  txt_in
    time_in.{0,2}                    time_in.{in_layer,out_layer}
    resolution_in.{0,2}              resolution_embedder.mlp.{in_layer,out_layer}
    blocks.i.modulation              blocks.i.modulation.lin
    blocks.i.img_qkv / txt_kv        blocks.i.attention.img_qkv_proj / txt_kv_proj
    blocks.i.q_norm / k_norm         blocks.i.attention.norm_q / norm_k
    blocks.i.txt_k_norm              blocks.i.attention.norm_added_k
    blocks.i.attn_out                blocks.i.attention.to_out.0
    blocks.i.mlp_in (rows: gate; up) blocks.i.gate_proj ; blocks.i.up_proj
    blocks.i.mlp_out                 blocks.i.down_proj
    final_layer.modulation / proj    final_layer.adaLN_modulation.1 / linear

The conversion is exact both ways (a row split and a concatenation). Nothing here imports
diffusers: the directory is written as diffusers' own ``save_pretrained`` would write it, and read
back the same way, so exporting needs only prx, and loading the export needs only torch,
transformers and diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from prx.config import ModelConfig
from prx.config.pretrained import (
    SHAPE_FIELDS,
    TRANSFORMER_CLASS,
    mlp_width_diffusers,
    model_config_from_diffusers,
    read_transformer_config,
)
from prx.config.safe_yaml import short
from prx.errors import CheckpointError, ConfigError, PrxError
from prx.hub import brief

DIFFUSERS_VERSION = "0.42.1"  # the first diffusers with PRXPixelPipeline, bottleneck_size and resolution_embeds
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's; PRXPixelPipeline feeds the model t = timestep / this

_BLOCK_NAMES = {  # prx block parameter → diffusers block parameter (mlp_in is split, see below)
    "modulation.weight": "modulation.lin.weight",
    "modulation.bias": "modulation.lin.bias",
    "img_qkv.weight": "attention.img_qkv_proj.weight",
    "txt_kv.weight": "attention.txt_kv_proj.weight",
    "q_norm.weight": "attention.norm_q.weight",
    "k_norm.weight": "attention.norm_k.weight",
    "txt_k_norm.weight": "attention.norm_added_k.weight",
    "attn_out.weight": "attention.to_out.0.weight",
    "mlp_out.weight": "down_proj.weight",
}
_TOP_PREFIXES = {  # prx prefix → diffusers prefix, outside the blocks
    "img_in.": "img_in.",
    "txt_in.": "txt_in.",
    "time_in.0.": "time_in.in_layer.",
    "time_in.2.": "time_in.out_layer.",
    "resolution_in.0.": "resolution_embedder.mlp.in_layer.",
    "resolution_in.2.": "resolution_embedder.mlp.out_layer.",
    "final_layer.modulation.": "final_layer.adaLN_modulation.1.",
    "final_layer.proj.": "final_layer.linear.",
}
_GEGLU = ("gate_proj.weight", "up_proj.weight")  # diffusers' halves of prx's mlp_in, in mlp_in's row order


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def diffusers_name(key: str) -> str:
    """The diffusers name of a prx parameter (mlp_in: its two halves)."""
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        if rest == "mlp_in.weight":
            return " + ".join(f"blocks.{index}.{half}" for half in _GEGLU)
        if rest in _BLOCK_NAMES:
            return f"blocks.{index}.{_BLOCK_NAMES[rest]}"
    for prx_prefix, diffusers_prefix in _TOP_PREFIXES.items():
        if key.startswith(prx_prefix):
            return diffusers_prefix + key[len(prx_prefix):]
    raise PrxError(f"prx parameter '{key}' has no diffusers counterpart (is this a PRX state dict?)")


def to_diffusers_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """prx PRX state dict → PRXTransformer2DModel state dict (the same tensors, renamed; mlp_in split in two)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        value = value.detach()
        if key.startswith("blocks.") and key.endswith(".mlp_in.weight"):
            prefix = key[: -len("mlp_in.weight")]
            gate, up = value.chunk(2, dim=0)
            out[prefix + _GEGLU[0]], out[prefix + _GEGLU[1]] = gate.contiguous(), up.contiguous()
        else:
            out[diffusers_name(key)] = value.contiguous()
    return out


def from_diffusers_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """PRXTransformer2DModel state dict → prx PRX state dict (the inverse of :func:`to_diffusers_state_dict`)."""
    block_names = {v: k for k, v in _BLOCK_NAMES.items()}
    out: dict[str, Tensor] = {}
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name = None
        if key.startswith("blocks.") and key.count(".") >= 2:
            _, index, rest = key.split(".", 2)
            if rest in _GEGLU:
                halves.setdefault(index, {})[rest] = value
                continue
            if rest in block_names:
                name = f"blocks.{index}.{block_names[rest]}"
        else:
            for prx_prefix, diffusers_prefix in _TOP_PREFIXES.items():
                if key.startswith(diffusers_prefix):
                    name = prx_prefix + key[len(diffusers_prefix):]
                    break
        if name is None:
            raise CheckpointError(f"diffusers parameter '{key}' has no counterpart in prx's PRX: not a PRX pixel "
                                  f"checkpoint this prx can read")
        out[name] = value
    for index, pair in halves.items():
        missing = [h for h in _GEGLU if h not in pair]
        if missing:
            raise CheckpointError(f"the diffusers checkpoint has no blocks.{index}.{missing[0]} (the other GeGLU half "
                                  f"is there)")
        out[f"blocks.{index}.mlp_in.weight"] = torch.cat([pair[_GEGLU[0]], pair[_GEGLU[1]]], dim=0)
    return out


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------




def diffusers_config_of(model: ModelConfig) -> dict:
    """The PRXTransformer2DModel config.json of a prx model config (raises if diffusers cannot express it)."""
    if model.text_dim is None:
        raise PrxError("the model config has no text_dim (the text encoder's width): export a checkpoint of a run")
    ours = int(round(model.hidden_dim * model.mlp_ratio))
    theirs = mlp_width_diffusers(model.hidden_dim, model.mlp_ratio)
    if ours != theirs:
        raise PrxError(f"model.mlp_ratio={model.mlp_ratio} gives a {ours}-wide GeGLU in prx but {theirs} in diffusers "
                       f"(int(hidden·ratio)): this model cannot be written as a PRXTransformer2DModel")
    head_dim = model.hidden_dim // model.num_heads
    theta = model.rope_theta
    return {
        "_class_name": TRANSFORMER_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "patch_size": model.patch_size,
        "context_in_dim": model.text_dim,
        "hidden_size": model.hidden_dim,
        "mlp_ratio": model.mlp_ratio,
        "num_heads": model.num_heads,
        "depth": model.num_layers,
        "axes_dim": [head_dim // 2, head_dim // 2],  # rows, columns: half of each head's rotation pairs each
        "theta": int(theta) if float(theta).is_integer() else theta,
        "time_factor": 1000.0,
        "time_max_period": 10000,
        "bottleneck_size": model.bottleneck_dim,
        "resolution_embeds": model.resolution_embeds,
    }








def read_transformer_weights(directory: Path) -> dict[str, Tensor]:
    """A diffusers model directory's safetensors weights, one file or sharded with an index. Only .safetensors files
    inside ``directory`` are read (an index whose ``weight_map`` names anything else is refused); a file that is
    truncated or not safetensors is one line naming it."""
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a weights index ({brief(e)}): it must hold a JSON \"weight_map\" "
                                  f"of parameter → file") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index} maps weights to {short(name)}: only .safetensors files beside it are "
                                      f"read (no paths, nothing outside {directory}); refused")
        files = [directory / name for name in names]
    else:
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME}): save the "
                              f"transformer with diffusers' save_pretrained (safetensors)")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as e:  # noqa: BLE001 - safetensors' own error (truncated, not safetensors), or an OSError
            raise CheckpointError(f"model.init_from: {file} cannot be read as safetensors weights ({brief(e, 120)}): "
                                  f"it is truncated or another kind of file; download it again") from None
    return state


def load_init_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load a diffusers PRX pixel checkpoint into a freshly built prx model (fine-tuning); returns a log line.

    The model's config must match the checkpoint's (:func:`prx.config.pretrained.fill_model` makes a config that does);
    a mismatch is a one-line error naming the key and both values or shapes.
    """
    directory, config = read_transformer_config(path)
    theirs = model_config_from_diffusers(config, directory)
    mine = model.config
    if mine.text_dim != theirs["text_dim"]:
        raise ConfigError(f"model.init_from '{path}' takes {theirs['text_dim']}-wide text tokens (context_in_dim) but "
                          f"this run's text encoder gives {mine.text_dim}: set text.encoder to the encoder that "
                          f"checkpoint was trained with")
    for key in SHAPE_FIELDS:
        if getattr(mine, key) != theirs[key]:
            raise ConfigError(f"model.{key}={getattr(mine, key)} but model.init_from '{path}' has {key}={theirs[key]}: "
                              f"set model.{key}={theirs[key]} (or leave it unset in the config)")
    state = from_diffusers_state_dict(read_transformer_weights(directory))
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise CheckpointError(f"model.init_from '{path}' lacks '{diffusers_name(key)}': the checkpoint is "
                                  f"incomplete")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"model.init_from '{path}': '{diffusers_name(key)}' has shape "
                                  f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in this model "
                                  f"(its config.json does not match its weights)")
    for key in state:
        if key not in own:
            raise CheckpointError(f"model.init_from '{path}' has '{diffusers_name(key)}', which this model lacks")
    model.load_state_dict(state)
    count = sum(v.numel() for v in state.values())
    return f"initialised from diffusers checkpoint {directory} ({count / 1e6:.1f}M parameters)"
