"""The run's typed configuration: :class:`Config` composes the sections, and :func:`load_config` reads one.

Every section is a dataclass that YAML mirrors one to one, with its rules declared beside its fields
(:mod:`prx.config.rules`) and its cross-field checks in its ``check(run)``: ``model:`` and ``lora:`` (:mod:`.model`),
``data:`` and ``text:`` (:mod:`.data`), the recipe's ``objective:``, ``tread:``, ``repa:``, ``perceptual:``,
``optimizer:`` and ``ema:`` (:mod:`.recipe`), ``train:`` and ``logging:`` (:mod:`.run`), ``sampling:`` and
``eval:`` (:mod:`.sampling`). Each component imports its own section from there; nothing in this package
imports a component, so reading a config imports no torch and a bad one answers at once.

Values resolve in this order: dataclass defaults (the recipe's), then a model preset, then the YAML file,
then dotted command-line overrides (``train.batch_size=32``). A config that sets ``model.init_from`` is a
fine-tune: its unset keys take the built-in ``finetune`` config's values, then what the pipeline decides (its
shape, text encoder, noise scale, resolution, :mod:`.pretrained`). Anything unknown, mistyped or impossible raises
:class:`ConfigError` with the key and how to fix it, before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prx.config.data import CaptionWeight, DataConfig, ShapesConfig, TextConfig
from prx.config.model import MODEL_PRESETS, LoRAConfig, ModelConfig
from prx.config.parse import (
    apply_override,
    build_section,
    builtin_configs,
    parse_override,
    read_yaml,
    resolve_config_path,
)
from prx.config.pretrained import fill_from_pretrained
from prx.config.recipe import EMAConfig, ObjectiveConfig, OptimizerConfig, PerceptualConfig, REPAConfig, TreadConfig
from prx.config.rules import check, check_fields
from prx.config.run import LoggingConfig, StageConfig, StageTricks, TrainConfig
from prx.config.sampling import EvalConfig, SamplingConfig
from prx.errors import ConfigError

__all__ = ["Config", "load_config", "config_from_dict", "validate", "SECTIONS", "MODEL_PRESETS", "ModelConfig",
           "DataConfig", "ShapesConfig", "CaptionWeight", "TextConfig", "ObjectiveConfig", "TreadConfig", "REPAConfig",
           "PerceptualConfig", "OptimizerConfig", "EMAConfig", "StageConfig", "StageTricks", "TrainConfig",
           "LoggingConfig", "SamplingConfig", "EvalConfig", "LoRAConfig", "ConfigError", "apply_override",
           "build_section", "builtin_configs", "parse_override", "read_yaml", "resolve_config_path",
           "config_from_saved", "migrate_saved_config"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
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
        p = self.perceptual
        terms += [f"LPIPS {p.lpips_weight:g}"] * on.lpips + [f"DINO {p.dino_weight:g}"] * on.dino
        return (f"stage {index + 1}/{len(self.stages)}: {stage.resolution}px, batch {stage.batch_size}, "
                f"{stage.steps} steps, {', '.join(terms)}")


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = build_section(Config, data, "")
    validate(cfg)
    return cfg


def migrate_saved_config(data: dict) -> dict:
    """A config saved by an older prx, as that prx meant it: defaults that changed since keep their old value.

    - model.norm_eps: LayerNorm eps was a fixed 1e-5 before the option (new runs: 1e-6, as diffusers);
    - sampling.schedule: sampling used shift(linspace(1, 0, N+1)) before the option (new runs: diffusers').
    """
    data = dict(data)
    if isinstance(data.get("model"), dict) and "norm_eps" not in data["model"]:
        data["model"] = {**data["model"], "norm_eps": 1e-5}
    if isinstance(data.get("sampling"), dict) and "schedule" not in data["sampling"]:
        data["sampling"] = {**data["sampling"], "schedule": "linspace"}
    return data


def config_from_saved(data: dict[str, Any]) -> Config:
    """The config a checkpoint or an export was written with (older prx versions' configs migrated)."""
    return config_from_dict(migrate_saved_config(data))


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path or a built-in name; None = the CPU demo) plus dotted overrides."""
    path = resolve_config_path(None if name_or_path is None else str(name_or_path))
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    for text in overrides or []:
        apply_override(data, text)
    return config_from_dict(fill_from_pretrained(data))


SECTIONS = ("model", "lora", "data", "text", "objective", "tread", "repa", "perceptual", "optimizer", "ema", "sampling",
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
