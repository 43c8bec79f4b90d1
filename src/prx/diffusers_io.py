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
import os
import shutil
import typing
from pathlib import Path

import torch
from torch import Tensor

from prx.config import Config, ModelConfig
from prx.errors import CheckpointError, ConfigError, PrxError

DIFFUSERS_VERSION = "0.42.1"  # the first diffusers with PRXPixelPipeline, bottleneck_size and resolution_embeds
TRANSFORMER_CLASS = "PRXTransformer2DModel"
PIPELINE_CLASS = "PRXPixelPipeline"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_NORM_EPS = 1e-6  # PRXTransformer2DModel's LayerNorm eps (fixed, not a config field)
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
# prx model fields a diffusers config decides (text_dim aside: it comes from the text encoder)
SHAPE_FIELDS = ("patch_size", "bottleneck_dim", "hidden_dim", "num_layers", "num_heads", "mlp_ratio", "rope_theta",
                "resolution_embeds", "norm_eps")


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
            raise CheckpointError(f"the diffusers checkpoint has no blocks.{index}.{missing[0]} (the other GeGLU half is there)")
        out[f"blocks.{index}.mlp_in.weight"] = torch.cat([pair[_GEGLU[0]], pair[_GEGLU[1]]], dim=0)
    return out


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _mlp_width_diffusers(hidden: int, ratio: float) -> int:
    return int(hidden * ratio)


def diffusers_config_of(model: ModelConfig) -> dict:
    """The PRXTransformer2DModel config.json of a prx model config (raises if diffusers cannot express it)."""
    if model.text_dim is None:
        raise PrxError("the model config has no text_dim (the text encoder's width): export a checkpoint of a run")
    ours, theirs = int(round(model.hidden_dim * model.mlp_ratio)), _mlp_width_diffusers(model.hidden_dim, model.mlp_ratio)
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
    if ours != _mlp_width_diffusers(hidden, float(c["mlp_ratio"])):
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


def read_transformer_weights(directory: Path) -> dict[str, Tensor]:
    """A diffusers model directory's safetensors weights, one file or sharded with an index."""
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for name in files:
                state.update(load_file(str(directory / name)))
            return state
    except (OSError, ValueError, KeyError) as e:  # a truncated or corrupt file, a bad index
        raise CheckpointError(f"the weights in {directory} cannot be read ({' '.join(str(e).split())[:160]})") from None
    raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME}): save the "
                          f"transformer with diffusers' save_pretrained (safetensors)")


def _coerce_field(key: str, value):
    from prx.checks import coerce

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


def load_init_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load a diffusers PRX pixel checkpoint into a freshly built prx model (fine-tuning); returns a log line.

    The model's config must match the checkpoint's (:func:`fill_model_config` makes a config that does);
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
            raise CheckpointError(f"model.init_from '{path}' lacks '{diffusers_name(key)}': the checkpoint is incomplete")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"model.init_from '{path}': '{diffusers_name(key)}' has shape {tuple(state[key].shape)} "
                                  f"in the checkpoint but {tuple(value.shape)} in this model (its config.json does not "
                                  f"match its weights)")
    for key in state:
        if key not in own:
            raise CheckpointError(f"model.init_from '{path}' has '{diffusers_name(key)}', which this model lacks")
    model.load_state_dict(state)
    count = sum(v.numel() for v in state.values())
    return f"initialised from diffusers checkpoint {directory} ({count / 1e6:.1f}M parameters)"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def scheduler_config(config: Config) -> dict:
    """FlowMatchEulerDiscreteScheduler with the run's sampling shift: its sigmas are prx's schedule 'diffusers'."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": float(config.sampling_shift),
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }


def recommended_guidance_scale(config: Config) -> float:
    """The CFG scale to use in diffusers: the run's, when it learnt an unconditional model (caption dropout)."""
    return float(config.sampling.guidance_scale) if config.data.caption_dropout > 0 else 1.0


def export_notes(config: Config) -> list[str]:
    """Where PRXPixelPipeline cannot sample the way `prx sample` does by default for this run."""
    s, notes = config.sampling, []
    if s.guidance in ("self", "both"):
        notes.append(
            f"this run samples with TREAD self-guidance by default (sampling.guidance={s.guidance}, self-guidance scale "
            f"{s.self_guidance_scale}); diffusers has no equivalent: PRXPixelPipeline uses classifier-free guidance only "
            f"(empty-caption negative), so its images match `prx sample --guidance cfg`, not the run's default")
    if s.guidance in ("cfg", "both") and 0 < s.guidance_scale < 1:
        notes.append(f"sampling.guidance_scale={s.guidance_scale} < 1: PRXPixelPipeline guides only for scales above 1")
    if s.sampler != "euler":
        notes.append(f"this run samples with {s.sampler} by default; PRXPixelPipeline integrates with Euler "
                     f"(FlowMatchEulerDiscreteScheduler): compare with `prx sample --sampler euler`")
    if list(s.guidance_interval) != [0.0, 1.0]:
        notes.append(f"this run guides only for t in {list(s.guidance_interval)} (sampling.guidance_interval); "
                     f"PRXPixelPipeline guides at every step")
    if s.schedule != "diffusers":
        notes.append("this run samples over shift(linspace(1, 0, N+1)) (sampling.schedule=linspace, a run from before "
                     "the option); FlowMatchEulerDiscreteScheduler's sigmas differ slightly, so images differ slightly "
                     "from `prx sample`'s")
    if config.objective.noise_offset:
        notes.append(f"this run trained with offset noise (objective.noise_offset={config.objective.noise_offset}); "
                     f"PRXPixelPipeline starts from plain randn · noise_scale, so its images vary less in global "
                     f"brightness than `prx sample`'s: pass prx's starting noise as `latents=` for the same images")
    if config.model.norm_eps != DIFFUSERS_NORM_EPS:
        notes.append(f"this model was trained with LayerNorm eps {config.model.norm_eps} (model.norm_eps); "
                     f"PRXTransformer2DModel's is {DIFFUSERS_NORM_EPS}: its x0 predictions differ by a few 1e-6 (relative)")
    return notes


def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def latest_eval_results(run_dir: Path) -> dict | None:
    """The newest ``RUN/eval/*/results.json`` (highest step, then newest file), or None."""
    found = []
    for path in (run_dir / "eval").glob("*/results.json"):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and isinstance(results.get("sets"), dict):
            step = results.get("step")
            found.append((step if isinstance(step, int) else -1, path.stat().st_mtime, path, results))
    if not found:
        return None
    step, _, path, results = max(found, key=lambda item: item[:2])
    return {**results, "_path": str(path)}


def latest_real_eval_results(run_dir: Path) -> dict | None:
    """The newest held-out evaluation, ``RUN/eval/*/real/results.json`` (``prx eval --data`` and the
    run's ``eval:`` during training write there): highest step, then newest file; or None."""
    found = []
    for path in (run_dir / "eval").glob("*/real/results.json"):
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and isinstance(results.get("metrics"), dict):
            step = results.get("step")
            found.append((step if isinstance(step, int) else -1, path.stat().st_mtime, path, results))
    if not found:
        return None
    return {**max(found, key=lambda item: item[:2])[3]}


def _real_eval_lines(results: dict, step: int) -> list[str]:
    settings = results.get("settings") or {}
    where = "The run's in-training evaluation (`eval:`)" if results.get("during_training") else "`prx eval --data`"
    lines = ["", "## Held-out evaluation", "",
             f"{where} at step {results.get('step', '?')}" + (" (not the exported step)" if results.get("step") != step else "")
             + f", {settings.get('evaluated', '?')} held-out samples at {settings.get('resolution', '?')} px, "
             f"{results.get('weights', 'ema')} weights, sampling {json.dumps(settings.get('sampling'))}:",
             "", "| metric | value | samples | note |", "|---|---|---|---|"]
    for name, r in results["metrics"].items():
        try:
            note = "biased upwards: few samples" if r.get("warning") else ""
            rows = [(name, r["value"], r.get("num_samples", r.get("num_fake")), note)]
            if name == "val_loss":
                rows += [(f"val_loss {bin_name}", b["value"], b["n"], "") for bin_name, b in r["bins"].items()]
            for label, value, n, note in rows:
                lines.append(f"| {label} | {'—' if value is None else f'{value:.5g}'} | {n} | {note} |")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return lines


def usage_snippet(path: str, config: Config, prompt: str = "a red circle in the top left") -> str:
    s = config.sampling
    binning = "" if config.stages[-1].resolution == 1024 else ", use_resolution_binning=False"
    return (
        "from diffusers import PRXPixelPipeline\n"
        f'pipe = PRXPixelPipeline.from_pretrained("{path}")\n'
        f'image = pipe("{prompt}", num_inference_steps={s.steps}, '
        f"guidance_scale={recommended_guidance_scale(config)}{binning}).images[0]"
    )


def model_card(config: Config, step: int, weights: str, params: int, notes: list[str], eval_results: dict | None,
               text_classes: tuple[str, str], name: str = "path/to/this/directory",
               real_results: dict | None = None) -> str:
    s, m, d, t = config.sampling, config.model, config.data, config.text
    res = config.stages[-1].resolution
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [prx, pixel-space, text-to-image, flow-matching]",
        "---",
        "",
        f"# {config.name}: a pixel-space PRX text-to-image model",
        "",
        f"Trained with `prx` (the PRX \"24-hour speedrun\" recipe in pixel space) and exported with "
        f"`prx export --format diffusers`: the {'EMA' if weights == 'ema' else 'raw'} weights of step "
        f"{step} of {config.total_steps}, {params / 1e6:.1f}M parameters, {res}×{res} px.",
        "",
        "## Use with diffusers",
        "",
        "```python",
        usage_snippet(name, config),
        "```",
        "",
        f"`{name}` is this directory (or its hub id once uploaded). Needs `torch`, `transformers`, "
        "`diffusers>=0.42.1` and `ftfy` (PRXPixelPipeline cleans prompts with it), not prx. `image` is a PIL image; "
        "`output_type=\"np\"` gives floats in [0, 1]. With `guidance_scale > 1`, give one prompt per call: "
        "PRXPixelPipeline (diffusers 0.42) batches the conditional and unconditional passes of a single prompt only.",
        "",
        "## Sampling: diffusers and `prx sample`",
        "",
        f"- Scheduler: `FlowMatchEulerDiscreteScheduler(shift={config.sampling_shift})`, whose sigmas are prx's "
        f"`sampling.schedule: diffusers`: PRXPixelPipeline takes the same steps as `prx sample`.",
        f"- Starting noise: `randn · noise_scale` with noise_scale={config.objective.noise_scale} (the pipeline's "
        f"`noise_scale`); prx seeds image i with seed + i, pass that noise as `latents=` to get the same image.",
        f"- The network predicts x0; both convert it to a velocity (x_t − x0)/max(t, {config.objective.t_clamp}).",
        f"- Guidance: classifier-free on x0, the empty caption as negative (diffusers' default `negative_prompt=\"\"`); "
        f"this run's default is `{s.guidance}` with scale {s.guidance_scale}"
        + (f" and self-guidance scale {s.self_guidance_scale}" if s.guidance != "cfg" else "")
        + f"; trained with caption dropout {d.caption_dropout}.",
        f"- Text: `{t.encoder}` ({text_classes[0]}), at most {t.max_length} tokens (the pipeline's `prompt_max_tokens`); "
        f"diffusers first cleans prompts (ftfy, HTML unescaping, surrounding spaces), which leaves plain text as it is.",
        f"- Defaults of this run: {s.steps} steps, {s.sampler} sampler.",
    ]
    if res != 1024:
        lines.append(f"- `use_resolution_binning=False`: diffusers' aspect-ratio bins exist only for 1024 px; this "
                     f"model samples {res} px (`default_sample_size`).")
    if notes:
        lines += ["", "**Differences from `prx sample`:**", ""] + [f"- {n}" for n in notes]
    stages = "\n".join(
        f"| {i + 1} | {st.resolution} | {st.steps} | {st.batch_size} | {'on' if st.tread and config.tread.route_ratio > 0 else 'off'} "
        f"| {'on' if st.repa and config.repa.weight > 0 else 'off'} | "
        f"{'on' if st.perceptual and (config.perceptual.lpips_weight > 0 or config.perceptual.dino_weight > 0) else 'off'} |"
        for i, st in enumerate(config.stages))
    data = {"shapes": "prx's procedural shapes world (coloured circles, squares, triangles)"}.get(
        d.dataset, f"{d.dataset}: " + ", ".join(f"`{p}`" for p in d.shards[:8]) + (" …" if len(d.shards) > 8 else ""))
    lines += [
        "",
        "## Training",
        "",
        f"- Model: PRX, {m.num_layers} blocks, hidden {m.hidden_dim}, {m.num_heads} heads, patch {m.patch_size}, "
        f"bottleneck {m.bottleneck_dim}, GeGLU ×{m.mlp_ratio}, LayerNorm eps {m.norm_eps}"
        + (", resolution embedding" if m.resolution_embeds else "")
        + (f" (preset `{m.preset}`)" if m.preset else "")
        + (f"; initialised from `{m.init_from}`" if m.init_from else ""),
        f"- Data: {data}; caption dropout {d.caption_dropout}",
        f"- Objective: x-prediction flow matching, logit-normal({config.objective.t_mean}, {config.objective.t_std}) "
        f"timesteps, shift {config.objective.shift}, {config.objective.uniform_fraction:.0%} uniform",
        f"- Optimizer: {config.optimizer.name}, lr {config.optimizer.lr}; EMA {config.ema.decay} every "
        f"{config.ema.update_every} steps",
        f"- Trained for {step} of {config.total_steps} steps:",
        "",
        "| stage | resolution | steps | batch | TREAD | REPA | perceptual |",
        "|---|---|---|---|---|---|---|",
        stages,
    ]
    if eval_results is not None:
        lines += [
            "",
            "## Evaluation",
            "",
            f"`prx eval` (shapes-world prompt adherence, judged from pixels) at step {eval_results.get('step', '?')}"
            + (" (not the exported step)" if eval_results.get("step") != step else "")
            + f", settings {json.dumps(eval_results.get('settings', {}))}:",
            "",
            "| prompt set | n | colour | shape | position | count | all-correct |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in eval_results["sets"].items():
            try:
                lines.append(f"| {name} | {r['n']} | {r['color']:.1%} | {r['shape']:.1%} | {r['position']:.1%} | "
                             f"{r['count']:.1%} | {r['all_correct']:.1%} |")
            except (KeyError, TypeError, ValueError):
                continue
    if real_results is not None:
        lines += _real_eval_lines(real_results, step)
    lines += ["", "## Full training config", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrxError(f"--out '{out}' already exists and is not empty: export writes a new directory, choose another "
                       f"--out (or remove that one)")
    if out.suffix == ".safetensors":
        raise PrxError(f"--out '{out}' names a file: --format diffusers writes a directory (use --format prx for one "
                       f".safetensors file)")


def export_pipeline(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> dict:
    """Write a checkpoint as a PRXPixelPipeline directory (atomically: a temporary directory renamed into place).

    Returns what the CLI reports: out, step, params, notes (where diffusers samples differently).
    """
    from safetensors.torch import save_file

    from prx.checkpoint import checkpoint_config, checkpoint_meta, find_checkpoint, load_weights
    from prx.model import build_model
    from prx.runtime import make_writable_dir
    from prx.text import TextEncoder

    out = Path(out)
    _check_out(out)
    ckpt = find_checkpoint(checkpoint)
    config = checkpoint_config(ckpt)
    transformer_config = diffusers_config_of(config.model)  # fails early on a model diffusers cannot hold
    step = int(checkpoint_meta(ckpt)["step"])
    model = build_model(config.model)
    load_weights(ckpt, model, weights)  # full tensors, whatever world size wrote the checkpoint
    tensors = to_diffusers_state_dict(model.state_dict())
    encoder = TextEncoder.from_config(config.text, "cpu")
    text_classes = (type(encoder.model).__name__, type(encoder.tokenizer).__name__)
    notes = export_notes(config)

    make_writable_dir(out.parent if str(out.parent) else Path("."))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "transformer").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        save_file(tensors, str(tmp / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / "transformer" / "config.json", transformer_config)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(config))
        encoder.model.save_pretrained(str(tmp / "text_encoder"))
        encoder.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _write_json(tmp / "model_index.json", {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": DIFFUSERS_VERSION,
            "default_sample_size": config.stages[-1].resolution,
            "noise_scale": float(config.objective.noise_scale),
            "prompt_max_tokens": config.text.max_length,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", text_classes[0]],
            "tokenizer": ["transformers", text_classes[1]],
            "transformer": ["diffusers", TRANSFORMER_CLASS],
        })
        params = sum(v.numel() for v in tensors.values())
        card = model_card(config, step, weights, params, notes, latest_eval_results(_run_dir_of(ckpt)), text_classes,
                          out.name, latest_real_eval_results(_run_dir_of(ckpt)))
        (tmp / "README.md").write_text(card)
        (tmp / "prx_config.yaml").write_text(config.to_yaml())
        try:
            os.replace(tmp, out)  # onto nothing, or onto an empty directory
        except OSError as e:
            raise PrxError(f"cannot move the export into place at '{out}' ({e.strerror}): choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "step": step, "params": params, "notes": notes, "config": config}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
