"""The seed's Python API: a run assembled from components in Python,

    Trainer(model=PRX({...}), router=TREADRouter(...), repa=REPAAlignment(...),
            perceptual_loss=PerceptualLoss(...), param_groups=[...], batch_size=1024,
            steps_512=100_000, steps_1024=20_000).run()

is the same run as a config: each component already holds its own config section (``router.config``
is the ``tread:`` section, ...), so this module only puts them together, with the recipe's two
stages, for the checkpoints, the plan and the logs.
"""

from __future__ import annotations

import torch

from prx.config import Config, StageConfig, validate
from prx.config.data import DataConfig
from prx.config.model import ModelConfig
from prx.config.recipe import OptimizerConfig, PerceptualConfig, REPAConfig, TreadConfig
from prx.config.run import TrainConfig
from prx.config.sampling import SamplingConfig
from prx.errors import ConfigError
from prx.model import PRX, model_config_from_dict
from prx.perceptual import PerceptualLoss
from prx.repa import REPAAlignment

COMPONENTS = ("model", "router", "repa", "perceptual_loss", "param_groups", "text_encoder")
SCHEDULE = ("batch_size", "steps_512", "steps_1024", "batch_size_1024")


def resolve_components(config: Config | None, given: dict) -> tuple[Config, dict]:
    """``Trainer(config)`` or ``Trainer(model=..., router=..., ...)``: the run's config (built from the
    components when there is none) and the components given (None for the rest: built from the config)."""
    unknown = sorted(set(given) - set(COMPONENTS) - set(SCHEDULE))
    if unknown:
        raise TypeError(f"Trainer() got an unexpected keyword argument '{unknown[0]}' "
                        f"(it takes {', '.join(COMPONENTS + SCHEDULE)})")
    components = {name: given.get(name) for name in COMPONENTS}
    if isinstance(components["model"], dict):
        components["model"] = PRX(model_config_from_dict(components["model"]))
    if config is None:
        if components["model"] is None:
            raise ConfigError("Trainer needs a config or a model")
        config = config_from_components(components["model"], components["router"], components["repa"],
                                        components["perceptual_loss"], components["param_groups"],
                                        *(given.get(name) for name in SCHEDULE))
    return config, components


def config_from_components(model, router, repa, perceptual_loss, param_groups, batch_size, steps_512, steps_1024,
                           batch_size_1024) -> Config:
    """The config of a run assembled from components."""
    if batch_size is None or (steps_512 is None and steps_1024 is None):
        raise ConfigError("Trainer(model=...) needs batch_size and steps_512 and/or steps_1024")
    stages = [StageConfig(resolution=512, steps=steps_512, batch_size=batch_size)] if steps_512 else []
    if steps_1024:  # the recipe's second stage: half the batch, REPA off
        stages.append(StageConfig(resolution=1024, steps=steps_1024,
                                  batch_size=batch_size_1024 or max(1, batch_size // 2), repa=False))
    optimizer = OptimizerConfig()
    if param_groups is not None:
        muon = any(str(g.get("optimizer", "adam")).lower() == "muon" for g in param_groups)
        optimizer = OptimizerConfig(name="muon" if muon else "adamw", lr=float(param_groups[0].get("lr", optimizer.lr)))
    cfg = Config(name="seed", model=model.config,
                 tread=router.config if router else TreadConfig(route_ratio=0.0),
                 repa=repa.config if repa else REPAConfig(weight=0.0),
                 perceptual=perceptual_loss.config if perceptual_loss else PerceptualConfig(lpips_weight=0.0,
                                                                                            dino_weight=0.0),
                 optimizer=optimizer, data=DataConfig(resolution=stages[0].resolution),
                 sampling=SamplingConfig(guidance="self" if router else "cfg"),
                 train=TrainConfig(stages=stages, batch_size=stages[0].batch_size,
                                   steps=sum(stage.steps for stage in stages)))
    validate(cfg)
    return cfg


def groups_after_sharding(groups: list[dict] | None, model, names: dict[int, str]) -> list[dict] | None:
    """The seed's param groups were built from the model before FSDP2 replaced its parameters:
    point them at the current ones, by name."""
    if groups is None:
        return None
    current = dict(model.named_parameters())
    return [{**g, "params": [current[names[id(p)]] if id(p) in names else p for p in g["params"]]} for g in groups]


def recipe_tricks(cfg: Config, given: dict, model_config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """(repa, perceptual): the seed's components where given, else built from the config's sections; the teachers
    load now, so a missing one fails before step 0. None for a trick that is off."""
    repa = given["repa"] or REPAAlignment.from_config(cfg.repa)
    if repa is not None:
        repa.setup(model_config.hidden_dim, model_config.num_layers, dtype=dtype).to(device)
    perceptual = given["perceptual_loss"] or PerceptualLoss.from_config(cfg.perceptual)
    if perceptual is not None:
        perceptual.load(dtype).to(device)
    return repa, perceptual
