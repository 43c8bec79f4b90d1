"""Typed run configuration.

Every section is a dataclass; a YAML file mirrors them one to one. Values are resolved in
this order: dataclass defaults (the recipe's), then a model preset, then the YAML file, then
dotted command-line overrides (``train.batch_size=32``). Anything unknown, mistyped or
impossible raises :class:`ConfigError` with the key and how to fix it, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prx.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The PRX transformer. ``preset`` fills every field not set explicitly."""

    preset: str | None = None
    patch_size: int = 32
    bottleneck_dim: int = 256  # linear bottleneck of the patch embedding: 3·p² → this → hidden
    hidden_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_ratio: float = 3.5  # GeGLU hidden size = mlp_ratio · hidden_dim
    rope_theta: float = 10000.0
    text_dim: int | None = None  # set from the text encoder when the model is built
    # LayerNorm eps of the blocks and the final layer: 1e-6 as diffusers' PRXTransformer2DModel. Runs saved
    # before this option existed trained with 1e-5 and keep it (prx.checkpoint.migrate_saved_config).
    norm_eps: float = 1e-6
    # add an embedding of the image's (height, width) in pixels to the timestep vector (diffusers' `resolution_embeds`)
    resolution_embeds: bool = False
    # a diffusers PRX pixel checkpoint (a transformer/ or a whole pipeline directory) a new run starts from;
    # shape fields not set in the config come from its config.json (prx.diffusers_io)
    init_from: str | None = None


# Named model sizes. `seed` is the speedrun seed config; `prx-small` the reference code's
# PRX-small; `demo`/`tiny` run on a laptop CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(patch_size=32, bottleneck_dim=256, hidden_dim=1024, num_layers=24, num_heads=16, mlp_ratio=3.5),
    "prx-small": dict(patch_size=32, bottleneck_dim=256, hidden_dim=1792, num_layers=16, num_heads=28, mlp_ratio=3.5),
    "prx-base": dict(patch_size=32, bottleneck_dim=256, hidden_dim=3584, num_layers=24, num_heads=28, mlp_ratio=3.5),
    "demo": dict(patch_size=8, bottleneck_dim=64, hidden_dim=256, num_layers=6, num_heads=4, mlp_ratio=3.0),
    "tiny": dict(patch_size=8, bottleneck_dim=32, hidden_dim=64, num_layers=4, num_heads=2, mlp_ratio=2.0),
}


@dataclass
class ShapesConfig:
    """The procedural shapes world (see prx.data.shapes)."""

    # relative frequency of scenes with 1, 2, 3 objects
    object_count_weights: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    seed: int = 0


@dataclass
class CaptionWeight:
    column: str = "caption"
    weight: float = 1.0


@dataclass
class DataConfig:
    # shapes: procedural, built in | shards: prx Parquet shards (see `prx data`) | parquet: Parquet
    # files as downloaded (e.g. from the Hugging Face hub), read in place through a column mapping
    dataset: str = "shapes"
    shards: list[str] = field(default_factory=list)  # directories, files or globs of shards (or of parquet files)
    # dataset=parquet: the column mapping, as `prx data convert --from parquet` takes it
    preset: str = ""  # flux-generated | flux-reason-6m | midjourney-v6-llava
    image_column: str = ""  # the image column (bytes or a {bytes, path} struct); default the preset's, else image
    caption_columns: list[str] = field(default_factory=list)  # "field" or "field=name"; default the preset's, else caption
    id_column: str = ""  # a stable id column; default the preset's, else file name and row
    resolution: int = 512
    caption_dropout: float = 0.1  # probability of replacing the caption by "" (enables CFG)
    # which caption column each sample uses, drawn by weight; empty = the shards' first column
    captions: list[CaptionWeight] = field(default_factory=list)
    embeddings: str = "auto"  # auto: use precomputed embeddings of text.encoder when every shard has them | off
    num_workers: int = 2  # DataLoader worker processes decoding images
    shuffle_window: int = 16  # row groups whose samples are shuffled together
    min_aspect: float = 0.5  # aspect-ratio buckets (width / height) span [min_aspect, max_aspect]
    max_aspect: float = 2.0
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TextConfig:
    # "minilm" (bundled, offline), a Hugging Face hub id, or a local directory
    encoder: str = "minilm"
    max_length: int = 64
    dtype: str = "float32"  # float32 | bfloat16 | float16
    cache_size: int = 100_000  # encodings of repeated captions are reused


@dataclass
class ObjectiveConfig:
    """x-prediction flow matching; x_t = (1-t)·x0 + t·noise, t=1 is pure noise."""

    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    shift: float = 3.0  # t' = s·t / (1 + (s-1)·t); 1 disables
    uniform_fraction: float = 0.1  # this share of t is drawn from U[t_min, 1), unshifted
    t_min: float = 1e-3
    t_clamp: float = 0.05  # velocity denominator max(t, t_clamp)
    noise_scale: float = 1.0


@dataclass
class OptimizerConfig:
    name: str = "muon"  # muon (Muon for 2D block matrices + Adam for the rest) | adamw
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear warm-up, then constant
    # warm-up / stable / decay: the last `decay_fraction` of train.steps decays linearly to lr·min_lr_ratio
    decay_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    muon_lr: float | None = None  # None = lr (Muon's update RMS is matched to Adam's)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_rms_scale: bool = True  # scale updates by 0.2·√max(m, n) to match Adam's RMS


@dataclass
class EMAConfig:
    decay: float = 0.999
    update_every: int = 10
    # decay_n = min(decay, (1+n)/(10+n)) over the n-th update: short runs need it
    warmup: bool = False


@dataclass
class TreadConfig:
    """TREAD token routing (training only): route_ratio of the image tokens skip blocks start..end."""

    route_ratio: float = 0.5  # 0 disables
    start_block: int = 2  # 0-based; negative counts from the end
    end_block: int = -2  # inclusive: -2 is the penultimate block


@dataclass
class REPAConfig:
    """Representation alignment of a block's output with a frozen vision teacher."""

    teacher: str = "dinov3"  # dinov3 | dinov2 | a hub id | a local directory
    weight: float = 0.5  # 0 disables
    block: int = 8  # the output of the 8th block (counted from 1, as in the REPA paper)
    projector_dim: int = 2048


@dataclass
class PerceptualConfig:
    """LPIPS-VGG and DINOv2 losses on the predicted x0 against x0."""

    lpips_weight: float = 0.1  # 0 disables
    dino_weight: float = 0.01  # 0 disables
    t_threshold: float = 1.0  # apply where t < t_threshold; 1 = at all noise levels (the recipe)
    dino_model: str = "dinov2"  # dinov2 | a hub id | a local directory
    dino_resolution: int = 224
    lpips_resize: float = 0.5
    lpips_vgg_weights: str | None = None  # torchvision vgg16-397923af.pth; None = $TORCH_HOME/hub/checkpoints/
    lpips_heads: str | None = None  # lpips' vgg.pth; None = the installed lpips package's, else prx's copy


@dataclass
class StageConfig:
    """One resolution stage of a run; which of the configured losses and routing are on."""

    resolution: int = 512
    steps: int = 1000
    batch_size: int = 64
    tread: bool = True
    repa: bool = True
    perceptual: bool = True


@dataclass
class SamplingConfig:
    sampler: str = "euler"  # euler | heun
    steps: int = 50
    guidance: str = "cfg"  # cfg (empty-caption negative) | self (TREAD self-guidance) | both
    guidance_scale: float = 3.5  # classifier-free guidance scale; 1 disables
    self_guidance_scale: float = 3.5  # out = routed + w·(dense − routed); 1 disables
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only for t in [lo, hi]
    shift: float | None = None  # time shift of the sampling schedule; None = objective.shift
    # diffusers: shift(linspace(1, shift(1/1000), N)) then 0, exactly diffusers' FlowMatchEulerDiscreteScheduler,
    # so an exported run samples the same images in PRXPixelPipeline | linspace: shift(linspace(1, 0, N+1)), the
    # reference code's (and prx's before the option; runs saved then keep it)
    schedule: str = "diffusers"
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 1024
    micro_batch_size: int = 0  # per forward/backward; gradients accumulate to batch_size. 0 = batch_size
    # Resolution stages; when set they replace data.resolution, train.steps and train.batch_size.
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU; weights stay fp32) | bf16 | fp32
    parallel: str = "auto"  # auto (FSDP2 when torchrun starts several processes) | fsdp | ddp | none
    compile: str = "auto"  # torch.compile each block: auto (on GPU) | on | off
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    async_checkpoint: bool = True  # write checkpoints in the background (visible once complete)
    timeout_minutes: float = 10.0  # a collective that waits longer (a dead rank) fails the job
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    time_limit_minutes: float = 0.0  # stop (with a checkpoint) after this long; 0 = no limit
    max_bad_steps: int = 20  # non-finite losses tolerated (skipped) before the run stops


@dataclass
class LoggingConfig:
    log_every: int = 10
    sample_every: int = 1000  # sample grid of the fixed prompts (EMA weights); 0 disables
    sample_steps: int = 25
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle in the top left",
            "a blue square in the bottom right",
            "a green triangle in the center",
            "a yellow circle in the top right",
            "a purple square in the bottom left",
            "an orange triangle in the top left",
            "a blue circle to the left of a red square",
            "a green square above an orange circle",
        ]
    )
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tread: TreadConfig = field(default_factory=TreadConfig)
    repa: REPAConfig = field(default_factory=REPAConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def sampling_shift(self) -> float:
        return self.objective.shift if self.sampling.shift is None else self.sampling.shift

    @property
    def stages(self) -> list[StageConfig]:
        """The run's stages: ``train.stages``, or one stage from the flat keys."""
        if self.train.stages:
            return self.train.stages
        return [StageConfig(resolution=self.data.resolution, steps=self.train.steps, batch_size=self.train.batch_size)]

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(index, stage) that optimizer step ``step`` (0-based) belongs to."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]


# --------------------------------------------------------------------------------------------
# Building a typed config from plain dicts, with errors that name the key
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the few safe conversions YAML needs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} (write it as [a, b, ...])")
        if dataclasses.is_dataclass(inner):
            return [v if isinstance(v, inner) else _build(inner, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
    return ConfigError(f"unknown config key '{full}': {hint}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _unknown_key(str(unknown[0]), prefix, list(fields))
    if cls is ModelConfig and data.get("preset") is not None:
        preset = data["preset"]
        if preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(str(preset), list(MODEL_PRESETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown model preset '{preset}'{hint}: choose one of {', '.join(MODEL_PRESETS)}"
            )
        data = {**MODEL_PRESETS[preset], **data}
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.batch_size=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


_INDEXED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]$")


def apply_override(data: dict[str, Any], text: str) -> None:
    """Set ``section.key=value`` (or ``train.stages[1].steps=value``) in a plain config dict."""
    path, value = parse_override(text)
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        indexed = _INDEXED.match(part)
        key = indexed.group(1) if indexed else part
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(path[:depth])}' is not a section")
        if indexed:
            items = node.get(key)
            index = int(indexed.group(2))
            if not isinstance(items, list) or index >= len(items):
                count = len(items) if isinstance(items, list) else 0
                raise ConfigError(f"override '{text}': {'.'.join(path[:depth] + [key])} has {count} entries, "
                                  f"so there is no [{index}]")
            if last:
                items[index] = value
            else:
                node = items[index]
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass an existing YAML file, or one of {', '.join(builtin_configs())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix the syntax there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
    return data


BUILTIN_CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | None) -> Path:
    """A YAML path, or the name of a config shipped with prx (``demo``, ``speedrun``, ...)."""
    if name_or_path is None:
        return BUILTIN_CONFIG_DIR / "demo.yaml"
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and (BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        return BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
    raise ConfigError(
        f"config '{name_or_path}' not found: pass a YAML file path or a built-in name ({', '.join(builtin_configs())})"
    )


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path or a built-in name; None = the CPU demo) plus dotted overrides."""
    path = resolve_config_path(None if name_or_path is None else str(name_or_path))
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    for text in overrides or []:
        apply_override(data, text)
    if isinstance(data.get("model"), dict) and data["model"].get("init_from"):
        from prx.diffusers_io import fill_model_config  # shape fields not set here come from the checkpoint

        data["model"] = fill_model_config(data["model"])
    return config_from_dict(data)


# --------------------------------------------------------------------------------------------
# Validation: impossible values fail here, before any work
# --------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    for name in ("patch_size", "bottleneck_dim", "hidden_dim", "num_layers", "num_heads"):
        _check(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _check(m.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {m.mlp_ratio}")
    _check(
        m.hidden_dim % m.num_heads == 0,
        f"model.hidden_dim={m.hidden_dim} is not divisible by model.num_heads={m.num_heads}: pick a head count that divides it",
    )
    head_dim = m.hidden_dim // m.num_heads
    _check(
        head_dim % 4 == 0,
        f"head dim model.hidden_dim/model.num_heads = {head_dim} must be a multiple of 4 for 2D RoPE: change num_heads",
    )
    patch_dim = 3 * m.patch_size**2
    _check(
        m.bottleneck_dim <= patch_dim,
        f"model.bottleneck_dim={m.bottleneck_dim} is larger than the patch dimension 3·{m.patch_size}² = {patch_dim}: "
        f"use a bottleneck ≤ {patch_dim}",
    )
    _check(m.text_dim is None or m.text_dim > 0, f"model.text_dim must be positive or null, got {m.text_dim}")
    _check(0 < m.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {m.norm_eps}: 1e-6 (new runs) or 1e-5")


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A model config from a plain dict (the seed's ``{"patch_size": 32, ...}``), presets and checks included.

    Without ``num_heads`` the heads are 64 wide; without ``text_dim`` the model takes the bundled
    MiniLM encoder's 384-wide tokens (set it for another encoder).
    """
    data = dict(data)
    if "num_heads" not in data and "hidden_dim" in data and data.get("preset") is None:
        data["num_heads"] = max(1, int(data["hidden_dim"]) // 64)
    cfg = _build(ModelConfig, data, "model.")
    if cfg.text_dim is None:
        cfg.text_dim = 384
    validate_model(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, d, o, opt = cfg.model, cfg.data, cfg.objective, cfg.optimizer
    validate_model(m)
    _check(d.resolution > 0, f"data.resolution must be positive, got {d.resolution}")
    _check(
        d.resolution % m.patch_size == 0,
        f"model.patch_size={m.patch_size} does not divide data.resolution={d.resolution}: "
        f"use a resolution that is a multiple of {m.patch_size}",
    )
    for i, st in enumerate(cfg.train.stages):
        key = f"train.stages[{i}]"
        _check(st.resolution > 0 and st.resolution % m.patch_size == 0,
               f"{key}.resolution={st.resolution} is not a positive multiple of model.patch_size={m.patch_size}")
        _check(st.steps >= 1, f"{key}.steps must be ≥ 1, got {st.steps}")
        _check(st.batch_size >= 1, f"{key}.batch_size must be ≥ 1, got {st.batch_size}")
    _check(0.0 <= d.caption_dropout < 1.0, f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
    _check(d.dataset in ("shapes", "shards", "parquet"),
           f"data.dataset='{d.dataset}' is unknown: use 'shapes', 'shards' or 'parquet'")
    _check(d.dataset == "shapes" or bool(d.shards),
           f"data.dataset={d.dataset} needs data.shards: a list of directories, files or globs"
           + (" (see `prx data convert`)" if d.dataset == "shards" else " of the downloaded .parquet files"))
    from prx.data.convert import PRESETS

    _check(not d.preset or d.preset in PRESETS, f"data.preset='{d.preset}' is unknown: use one of {', '.join(PRESETS)}")
    _check(d.dataset == "parquet" or not (d.preset or d.image_column or d.caption_columns or d.id_column),
           "data.preset / image_column / caption_columns / id_column map downloaded files: set data.dataset=parquet "
           "(prx shards need no mapping)")
    _check(all(c.weight >= 0 for c in d.captions) and (not d.captions or sum(c.weight for c in d.captions) > 0),
           "data.captions weights must be ≥ 0 with a positive sum")
    _check(d.embeddings in ("auto", "off"), f"data.embeddings must be auto or off, got '{d.embeddings}'")
    _check(d.num_workers >= 0, f"data.num_workers must be ≥ 0, got {d.num_workers}")
    _check(d.shuffle_window >= 1, f"data.shuffle_window must be ≥ 1, got {d.shuffle_window}")
    _check(0 < d.min_aspect <= 1 <= d.max_aspect, "data.min_aspect ≤ 1 ≤ data.max_aspect, both positive")
    w = d.shapes.object_count_weights
    _check(
        1 <= len(w) <= 3 and all(x >= 0 for x in w) and sum(w) > 0,
        "data.shapes.object_count_weights must be 1 to 3 non-negative weights (for 1, 2, 3 objects) with a positive sum",
    )
    _check(cfg.text.max_length > 0, f"text.max_length must be positive, got {cfg.text.max_length}")
    _check(
        cfg.text.dtype in ("float32", "bfloat16", "float16"),
        f"text.dtype must be float32, bfloat16 or float16, got '{cfg.text.dtype}'",
    )
    _check(o.t_std > 0, f"objective.t_std must be positive, got {o.t_std}")
    _check(o.shift > 0, f"objective.shift must be positive, got {o.shift}")
    _check(0.0 <= o.uniform_fraction <= 1.0, f"objective.uniform_fraction must be in [0, 1], got {o.uniform_fraction}")
    _check(0.0 <= o.t_min < 1.0, f"objective.t_min must be in [0, 1), got {o.t_min}")
    _check(0.0 < o.t_clamp < 1.0, f"objective.t_clamp must be in (0, 1), got {o.t_clamp}")
    _check(o.noise_scale > 0, f"objective.noise_scale must be positive, got {o.noise_scale}")
    _check(opt.name in ("adamw", "muon"), f"optimizer.name='{opt.name}' is not supported: use 'muon' or 'adamw'")
    _check(opt.muon_lr is None or opt.muon_lr > 0, f"optimizer.muon_lr must be positive or null, got {opt.muon_lr}")
    _check(0.0 <= opt.muon_momentum < 1.0, f"optimizer.muon_momentum must be in [0, 1), got {opt.muon_momentum}")
    _check(opt.muon_ns_steps >= 1, f"optimizer.muon_ns_steps must be ≥ 1, got {opt.muon_ns_steps}")
    _check(opt.lr > 0, f"optimizer.lr must be positive, got {opt.lr}: a learning rate like 1e-4")
    _check(
        len(opt.betas) == 2 and all(0.0 <= b < 1.0 for b in opt.betas),
        f"optimizer.betas must be two numbers in [0, 1), got {opt.betas}",
    )
    _check(opt.eps > 0, f"optimizer.eps must be positive, got {opt.eps}")
    _check(opt.weight_decay >= 0, f"optimizer.weight_decay must be ≥ 0, got {opt.weight_decay}")
    _check(opt.warmup_steps >= 0, f"optimizer.warmup_steps must be ≥ 0, got {opt.warmup_steps}")
    _check(0.0 <= opt.decay_fraction <= 1.0, f"optimizer.decay_fraction must be in [0, 1], got {opt.decay_fraction}")
    _check(0.0 <= opt.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio must be in [0, 1], got {opt.min_lr_ratio}")
    _check(opt.grad_clip >= 0, f"optimizer.grad_clip must be ≥ 0 (0 disables), got {opt.grad_clip}")
    _check(0.0 <= cfg.ema.decay < 1.0, f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    _check(cfg.ema.update_every >= 1, f"ema.update_every must be ≥ 1, got {cfg.ema.update_every}")
    s = cfg.sampling
    _check(s.sampler in ("euler", "heun"), f"sampling.sampler must be 'euler' or 'heun', got '{s.sampler}'")
    _check(s.guidance in ("cfg", "self", "both"), f"sampling.guidance must be cfg, self or both, got '{s.guidance}'")
    _check(s.self_guidance_scale >= 0, f"sampling.self_guidance_scale must be ≥ 0, got {s.self_guidance_scale}")
    _check(s.steps >= 1, f"sampling.steps must be ≥ 1, got {s.steps}")
    _check(s.guidance_scale >= 0, f"sampling.guidance_scale must be ≥ 0, got {s.guidance_scale}")
    gi = s.guidance_interval
    _check(
        len(gi) == 2 and 0.0 <= gi[0] <= gi[1] <= 1.0,
        f"sampling.guidance_interval must be [lo, hi] with 0 ≤ lo ≤ hi ≤ 1, got {gi}",
    )
    _check(s.shift is None or s.shift > 0, f"sampling.shift must be positive or null, got {s.shift}")
    _check(s.schedule in ("diffusers", "linspace"), f"sampling.schedule must be diffusers or linspace, got '{s.schedule}'")
    tr, rp, pc = cfg.tread, cfg.repa, cfg.perceptual
    _check(0.0 <= tr.route_ratio < 1.0, f"tread.route_ratio must be in [0, 1) (0 disables), got {tr.route_ratio}")
    n = m.num_layers
    if tr.route_ratio > 0:
        ok = -n <= tr.start_block < n and -n <= tr.end_block < n and tr.start_block % n <= tr.end_block % n
        _check(ok, f"tread.start_block={tr.start_block}..tread.end_block={tr.end_block} is not a block range of a "
                   f"{n}-block model: use 0 ≤ start ≤ end < {n} (negative values count from the end)")
    _check(rp.weight >= 0, f"repa.weight must be ≥ 0 (0 disables), got {rp.weight}")
    _check(rp.weight == 0 or 1 <= rp.block <= n,
           f"repa.block={rp.block} must be between 1 and model.num_layers={n} (it counts blocks from 1)")
    _check(rp.projector_dim >= 1, f"repa.projector_dim must be ≥ 1, got {rp.projector_dim}")
    _check(pc.lpips_weight >= 0 and pc.dino_weight >= 0, "perceptual.lpips_weight and perceptual.dino_weight must be ≥ 0")
    _check(0.0 < pc.t_threshold <= 1.0, f"perceptual.t_threshold must be in (0, 1], got {pc.t_threshold}")
    _check(0.0 < pc.lpips_resize <= 1.0, f"perceptual.lpips_resize must be in (0, 1], got {pc.lpips_resize}")
    _check(pc.dino_resolution > 0, f"perceptual.dino_resolution must be positive, got {pc.dino_resolution}")
    _check(cfg.sampling.guidance == "cfg" or tr.route_ratio > 0,
           f"sampling.guidance={cfg.sampling.guidance} needs TREAD routing (tread.route_ratio > 0) for its routed pass")
    t = cfg.train
    _check(t.steps >= 1, f"train.steps must be ≥ 1, got {t.steps}")
    _check(t.batch_size >= 1, f"train.batch_size must be ≥ 1, got {t.batch_size}")
    _check(t.micro_batch_size >= 0, f"train.micro_batch_size must be ≥ 0 (0 = the whole batch), got {t.micro_batch_size}")
    for st in cfg.stages:
        _check(t.micro_batch_size == 0 or st.batch_size % t.micro_batch_size == 0,
               f"train.micro_batch_size={t.micro_batch_size} does not divide the batch size {st.batch_size}: "
               f"use a divisor so gradients accumulate over whole micro-batches")
    _check(t.precision in ("auto", "bf16", "fp32"), f"train.precision must be auto, bf16 or fp32, got '{t.precision}'")
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'",
    )
    _check(t.num_threads >= 0, f"train.num_threads must be ≥ 0, got {t.num_threads}")
    _check(t.parallel in ("auto", "fsdp", "ddp", "none"), f"train.parallel must be auto, fsdp, ddp or none, got '{t.parallel}'")
    _check(t.compile in ("auto", "on", "off"), f"train.compile must be auto, on or off, got '{t.compile}'")
    _check(t.timeout_minutes > 0, f"train.timeout_minutes must be positive, got {t.timeout_minutes}")
    _check(t.checkpoint_every >= 1, f"train.checkpoint_every must be ≥ 1, got {t.checkpoint_every}")
    _check(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be ≥ 1, got {t.keep_checkpoints}")
    _check(t.time_limit_minutes >= 0, f"train.time_limit_minutes must be ≥ 0, got {t.time_limit_minutes}")
    _check(t.max_bad_steps >= 0, f"train.max_bad_steps must be ≥ 0, got {t.max_bad_steps}")
    lg = cfg.logging
    _check(lg.log_every >= 1, f"logging.log_every must be ≥ 1, got {lg.log_every}")
    _check(lg.sample_every >= 0, f"logging.sample_every must be ≥ 0 (0 disables), got {lg.sample_every}")
    _check(lg.sample_steps >= 1, f"logging.sample_steps must be ≥ 1, got {lg.sample_steps}")
