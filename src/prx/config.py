"""The run's typed configuration: the run-level schema, model presets, the YAML/override parser
and the run-level checks.

Every section is a dataclass that YAML mirrors one to one. The recipe's components own their
sections, checks included, beside the code they configure (``tread:`` in ``tread.py``, ``repa:`` in
``repa.py``, ``perceptual:``, ``ema:``, ``optimizer:`` (with the LR schedule), ``text:``); this
module composes them with the run-level ones (model, data, objective, sampling, stages, train,
logging). Values resolve in this order: dataclass defaults (the recipe's), then a model preset,
then the YAML file, then dotted command-line overrides (``train.batch_size=32``). Anything
unknown, mistyped or impossible raises :class:`ConfigError` with the key and how to fix it,
before any work starts — and before torch is even imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from prx.checks import at_least, check, check_fields, coerce, one_of, positive, unknown_key, within
from prx.data.sources import DataConfig
from prx.ema import EMAConfig
from prx.errors import ConfigError
from prx.flow import ObjectiveConfig
from prx.logger import LoggingConfig
from prx.metrics.config import EvalConfig
from prx.optim import OptimizerConfig
from prx.perceptual import PerceptualConfig
from prx.repa import REPAConfig
from prx.sampling import SamplingConfig
from prx.text import TextConfig
from prx.tread import TreadConfig

# --------------------------------------------------------------------------------------------
# Run-level sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """``model:`` the PRX transformer. ``preset`` fills every field not set explicitly."""

    preset: str | None = None
    patch_size: int = positive(32)
    bottleneck_dim: int = positive(256)  # linear bottleneck of the patch embedding: 3·p² → this → hidden
    hidden_dim: int = positive(1024)
    num_layers: int = positive(24)
    num_heads: int = positive(16)
    mlp_ratio: float = positive(3.5)  # GeGLU hidden size = mlp_ratio · hidden_dim
    rope_theta: float = positive(10000.0)
    text_dim: int | None = positive(None)  # set from the text encoder when the model is built
    # LayerNorm eps of the blocks and the final layer: 1e-6 as diffusers' PRXTransformer2DModel. Runs saved
    # before this option existed trained with 1e-5 and keep it (prx.checkpoint.migrate_saved_config).
    norm_eps: float = within(1e-6, 0, 1, open_low=True, open_high=True, hint=": 1e-6 (new runs) or 1e-5")
    # add an embedding of the image's (height, width) in pixels to the timestep vector (diffusers' `resolution_embeds`)
    resolution_embeds: bool = False
    # std of the patch embedding's initial bias (0: zeros, as PRX). Without a bias a flat patch of grey g embeds
    # to g times one vector, and every LayerNorm after it sees the same token for every grey: the model cannot
    # tell a flat 225 from a flat 245 (benchmarks/brightness_probe.py). Initialisation only: not a shape field.
    patch_bias_std: float = at_least(0.0, 0)
    # a diffusers PRX pixel checkpoint (a transformer/ or a whole pipeline directory) a new run starts from;
    # shape fields not set in the config come from its config.json (prx.diffusers_io)
    init_from: str | None = None

    def check(self, run=None) -> None:
        check(self.hidden_dim % self.num_heads == 0, f"model.hidden_dim={self.hidden_dim} is not divisible by "
              f"model.num_heads={self.num_heads}: pick a head count that divides it")
        head_dim = self.hidden_dim // self.num_heads
        check(head_dim % 4 == 0, f"head dim model.hidden_dim/model.num_heads = {head_dim} must be a multiple of 4 "
                                 f"for 2D RoPE: change num_heads")
        patch_dim = 3 * self.patch_size**2
        check(self.bottleneck_dim <= patch_dim, f"model.bottleneck_dim={self.bottleneck_dim} is larger than the patch "
              f"dimension 3·{self.patch_size}² = {patch_dim}: use a bottleneck ≤ {patch_dim}")


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
class StageConfig:
    """One resolution stage of a run; which of the configured losses and routing are on."""

    resolution: int = positive(512)
    steps: int = at_least(1000, 1)
    batch_size: int = at_least(64, 1)
    tread: bool = True
    repa: bool = True
    perceptual: bool = True


@dataclass(frozen=True)
class StageTricks:
    """Which of the recipe's tricks are on in a stage: configured (weight or ratio > 0) and enabled there."""

    tread: bool
    repa: bool
    lpips: bool
    dino: bool

    @property
    def perceptual(self) -> bool:
        return self.lpips or self.dino


@dataclass
class TrainConfig:
    """``train:`` the loop, its scale-out and its checkpoints."""

    steps: int = at_least(100_000, 1)
    batch_size: int = at_least(1024, 1)
    micro_batch_size: int = at_least(0, 0, hint=" (0 = the whole batch)")  # gradients accumulate to batch_size
    # Resolution stages; when set they replace data.resolution, train.steps and train.batch_size.
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = one_of("auto", "bf16", "fp32")  # auto: bf16 on GPU, fp32 on CPU; weights stay fp32
    parallel: str = one_of("auto", "fsdp", "ddp", "none")  # auto: FSDP2 when torchrun starts several processes
    compile: str = one_of("auto", "on", "off")  # torch.compile each block: auto = on GPU
    # torch.compile the frozen networks too (LPIPS-VGG, the DINO models): auto = where the blocks compile on a GPU
    # (1.19× the recipe's step on an H200: the teachers' forward and backward took 61 ms of it, then 30)
    compile_teachers: str = one_of("auto", "on", "off")
    # torch.compile Muon's memory-bound work (momentum, the stacks, casts, the update) into two passes per stack of
    # same-shape matrices: auto = with the blocks as CUDA graphs (1.08× there on an H200; 0.95× without them)
    compile_optimizer: str = one_of("auto", "on", "off")
    # the compiled blocks' image shapes: static = a graph per shape (the caption length stays dynamic), dynamic =
    # torch's choice (dynamic from the second shape on); auto = static on a GPU for at most 8 block shapes (1.10×
    # on an H200), else dynamic
    compile_shapes: str = one_of("auto", "static", "dynamic")
    # replay each compiled block as a CUDA graph (torch.compile mode="reduce-overhead"): one launch per block in
    # place of ~50, for a GPU that waits on the host. GPU only; not with FSDP (its hooks communicate in the block).
    # auto = on one GPU with static shapes, one micro-batch a step and captions padded to one length (text.min_length
    # = text.max_length): 1.13-1.21× on an H200, the same losses; on = also with DDP, micro-batches, varying caption
    # lengths or dynamic shapes (not measured); true/false read as on/off
    cuda_graphs: str = one_of("auto", "on", "off")
    # replay the compiled teachers (LPIPS-VGG, the DINO models) as CUDA graphs too (they are never sharded: FSDP
    # takes them as well). auto = with the blocks' CUDA graphs: their host time went from ~35 to ~10 ms a step on an
    # H200, peak memory 12.5 → 9.0 GiB, the same losses; on = wherever the teachers compile on a GPU
    cuda_graphs_teachers: str = one_of("auto", "on", "off")
    # the attention kernel: sdpa (torch's fused kernel) or math (written out, fused by inductor). auto: math on a
    # CPU for ≤ 64 image tokens when compiled or in bf16, where the fused kernel's backward is slow; sdpa elsewhere
    attention: str = one_of("auto", "sdpa", "math")
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    async_checkpoint: bool = True  # write checkpoints in the background (visible once complete)
    timeout_minutes: float = positive(10.0)  # a collective that waits longer (a dead rank) fails the job
    num_threads: int = at_least(0, 0)  # CPU threads for torch; 0 = torch's default
    checkpoint_every: int = at_least(1000, 1)
    keep_checkpoints: int = at_least(2, 1)
    time_limit_minutes: float = at_least(0.0, 0)  # stop (with a checkpoint) after this long; 0 = no limit
    # train for about this long: the measured step rate sets the step count (at most train.steps; estimated
    # after 40 steps, measured again halfway and late, fixed before the decay), so the LR schedule's decay
    # ends with the budget; 0 = exactly train.steps
    time_budget_minutes: float = at_least(0.0, 0)
    # the steps this config needs to reach its published quality (0 = not stated): when the time budget buys
    # fewer on this machine, the line that fixes the count says so, with the budget that would buy them
    recommended_steps: int = at_least(0, 0)
    max_bad_steps: int = at_least(20, 0)  # non-finite losses tolerated (skipped) before the run stops

    # a resumed run keeps its seed: the randomness of step n (data, noise, routes) derives from it.
    # The stages are checked by resume_changes: those that have started keep resolution and batch size.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("seed",)

    def check(self, run) -> None:
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
              f"train.device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        check(not (self.time_budget_minutes and self.stages), "train.time_budget_minutes sets the step count of a "
              "single-stage run: drop train.stages or set the stages' steps yourself")
        check(not (self.time_limit_minutes and self.time_limit_minutes < self.time_budget_minutes),
              f"train.time_limit_minutes={self.time_limit_minutes:g} (the safety net that stops a run) is shorter than "
              f"train.time_budget_minutes={self.time_budget_minutes:g}: the run would stop before its LR decay ends. "
              f"Raise it too (e.g. train.time_limit_minutes={self.time_budget_minutes * 1.3:g}) or set 0 for no limit")


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
    eval: EvalConfig = field(default_factory=EvalConfig)
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

    def tricks(self, stage: StageConfig) -> StageTricks:
        """Is this trick on in this stage? The one answer the step, --dry-run, bench and the logs use."""
        p = self.perceptual
        return StageTricks(tread=stage.tread and self.tread.route_ratio > 0, repa=stage.repa and self.repa.weight > 0,
                           lpips=stage.perceptual and p.lpips_weight > 0, dino=stage.perceptual and p.dino_weight > 0)

    def check_world(self, world: int) -> None:
        """Every stage's global batch splits evenly over ``world`` ranks (checked before any set-up)."""
        for i, stage in enumerate(self.stages):
            key = f"train.stages[{i}].batch_size" if self.train.stages else "train.batch_size"
            check(stage.batch_size % world == 0,
                  f"{key}={stage.batch_size} does not split over {world} ranks: use a multiple of {world} "
                  f"(e.g. {max(world, stage.batch_size // world * world)}) or another number of processes")

    def describe_stage(self, index: int) -> str:
        stage, on = self.stages[index], self.tricks(self.stages[index])
        terms = ["flow"] + [f"TREAD {self.tread.route_ratio:g}"] * on.tread + [f"REPA {self.repa.weight:g}"] * on.repa
        terms += [f"LPIPS {self.perceptual.lpips_weight:g}"] * on.lpips + [f"DINO {self.perceptual.dino_weight:g}"] * on.dino
        return (f"stage {index + 1}/{len(self.stages)}: {stage.resolution}px, batch {stage.batch_size}, "
                f"{stage.steps} steps, {', '.join(terms)}")


# --------------------------------------------------------------------------------------------
# Building a typed config from plain dicts, with errors that name the key
# --------------------------------------------------------------------------------------------


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A config dataclass from a plain dict, every key and type checked (presets applied to ``model``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise unknown_key(str(unknown[0]), prefix, list(fields))
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
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value if value is not None else {}, f"{key}.")
        elif dataclasses.is_dataclass(inner) and isinstance(value, (list, tuple)):  # train.stages
            kwargs[name] = [v if isinstance(v, inner) else build_section(inner, v, f"{key}[{i}].")
                            for i, v in enumerate(value)]
        else:
            kwargs[name] = coerce(value, tp, key)
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
    cfg = build_section(Config, data, "")
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

SECTIONS = ("model", "data", "text", "objective", "tread", "repa", "perceptual", "optimizer", "ema", "sampling",
            "train", "logging", "eval")


def validate(cfg: Config) -> None:
    """Each section's own rules (declared beside its fields, plus its ``check``), then the run's."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        check_fields(section, name)
        if hasattr(section, "check"):
            section.check(cfg)
    for i, stage in enumerate(cfg.train.stages):
        check_fields(stage, f"train.stages[{i}]")
    for c in cfg.data.captions:
        check_fields(c, "data.captions")
    p = cfg.model.patch_size
    check(cfg.data.resolution % p == 0, f"model.patch_size={p} does not divide data.resolution={cfg.data.resolution}: "
                                        f"use a resolution that is a multiple of {p}")
    for i, stage in enumerate(cfg.stages):
        check(stage.resolution % p == 0,
              f"train.stages[{i}].resolution={stage.resolution} is not a multiple of model.patch_size={p}")
        micro = cfg.train.micro_batch_size
        check(micro == 0 or stage.batch_size % micro == 0,
              f"train.micro_batch_size={micro} does not divide the batch size {stage.batch_size}: "
              f"use a divisor so gradients accumulate over whole micro-batches")
