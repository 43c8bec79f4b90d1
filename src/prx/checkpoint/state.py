"""What a checkpoint holds, by key (the tensors stay sharded under FSDP2; values that are not tensors go to
``state.json``)::

    model.denoiser.*, model.repa_projector.*   the trained modules (the projector only with REPA)
    optimizer.state.*                          Muon and Adam state tensors (torch's get_state_dict layout)
    ema.model.*                                the EMA copy of the denoiser: what sampling uses
    rng.torch                                  the CPU generator's state, as a uint8 tensor
    state.json: trainer.step, trainer.bad_steps, trainer.health (the divergence watch's reference window),
                ema.num_updates, data.* (the data source's exact position)

The optimizers' hyperparameters are not saved: they come from the config, so a changed ``optimizer.lr`` takes
effect on resume.

A LoRA run (``lora.enabled``) saves what trains only: the adapters (``...lora_A.default.weight``), their EMA and
optimizer state, megabytes; its meta.json names the frozen base (``lora_base``: ``model.init_from`` and a
fingerprint of its weights), which every reader loads first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from prx.checkpoint.read import STATE, find_checkpoint, load_checkpoint
from prx.errors import CheckpointDamaged

# the frozen parameters (a LoRA run's base) are neither saved nor loaded: they come from model.init_from
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
TRAINED_ONLY_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def training_state(trainer) -> dict:
    """Everything a run needs to continue exactly, in the layout above (tensors stay sharded; the
    values that are not tensors go to state.json). The optimizers' hyperparameters are not part of
    it: they come from the run's config (a changed ``optimizer.lr`` takes effect on resume)."""

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers, options=TRAINED_ONLY)
    return {
        "model": model_state,
        "optimizer": {"state": optim_state["state"]},
        "ema": trainer.ema.state_dict(),
        "trainer": {"step": trainer.step, "bad_steps": trainer.bad_steps, "health": trainer.health.state_dict()},
        "data": trainer.data.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


def restore_training_state(trainer, path: Path) -> None:

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers, options=TRAINED_ONLY)
    tensors = {"model": model_state, "optimizer": {"state": optim_state["state"]},
               "ema": {"model": trainer.ema.state_dict()["model"]}, "rng": {"torch": torch.get_rng_state()}}
    values = load_checkpoint(path, tensors, trainer.model_config)
    # the param groups (lr, base_lr, betas, ...) stay this run's: only the optimizers' state tensors are loaded
    optim = {"state": tensors["optimizer"]["state"], "param_groups": optim_state["param_groups"]}
    set_state_dict(trainer.trainable, trainer.optimizer.optimizers, model_state_dict=tensors["model"],
                   optim_state_dict=optim, options=TRAINED_ONLY_LOAD)  # (every trained tensor was read above)
    try:
        num_updates = int(values["ema"]["num_updates"])
        trainer.ema.load_state_dict({"model": tensors["ema"]["model"], "num_updates": num_updates})
        trainer.step = int(values["trainer"]["step"])
        trainer.bad_steps = int(values["trainer"]["bad_steps"])
        health = values["trainer"].get("health", {})  # (not in checkpoints of older prx versions)
        trainer.health.load_state_dict(health if isinstance(health, dict) else {"window": None})
        data = values.get("data", {})
        if not isinstance(data, dict):
            raise TypeError("data")
        trainer.data.load_state_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint '{path}' is damaged: {STATE} has no valid {e}") from None
    torch.set_rng_state(tensors["rng"]["torch"])


def load_weights(path: str | Path, model: torch.nn.Module, weights: str = "ema") -> Path:
    """Fill a (full, unsharded) denoiser with a checkpoint's EMA or raw weights, whatever world size
    wrote it; returns the checkpoint directory. For sampling, export and evaluation: tensors only. A model with
    frozen parameters (a LoRA run's, its base already loaded: :func:`prx.lora.adapt`) takes the trained ones only."""
    if weights not in ("ema", "model"):
        raise ValueError("weights must be 'ema' or 'model'")
    tensors = model.state_dict()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if trained and len(trained) < len(list(model.parameters())):  # as saved: the frozen part comes from elsewhere
        tensors = {k: v for k, v in tensors.items() if k in trained}
    if weights == "ema":
        state = {"ema": {"model": tensors}}
    else:
        state = {"model": {f"denoiser.{k}": v for k, v in tensors.items()}}
    path = find_checkpoint(path)
    load_checkpoint(path, state, getattr(model, "config", None))
    return path


def split_state(state: dict, where: str = "", _seen: set | None = None) -> tuple[dict, dict]:
    """(tensors, values): the tensor leaves of a nested state dict (for safetensors, which stores a
    memory shared by two entries once per entry: such a tensor is copied) and the rest (plain JSON
    values: numbers, strings, lists, dicts)."""
    tensors, values = {}, {}
    seen = set() if _seen is None else _seen
    for key, value in state.items():
        name = f"{where}{key}"
        if isinstance(value, torch.Tensor):
            if not hasattr(value, "to_local"):  # a DTensor's local shard is its own
                ptr = value.untyped_storage().data_ptr()
                if ptr in seen:
                    value = value.clone()
                    ptr = value.untyped_storage().data_ptr()
                seen.add(ptr)
            tensors[key] = value
        elif isinstance(value, dict):
            t, v = split_state(value, name + ".", seen)
            if t:
                tensors[key] = t
            if v or not t:
                values[key] = v
        else:
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError):
                raise TypeError(f"checkpoint state '{name}' is a {type(value).__name__}: only tensors and JSON "
                                f"values (numbers, strings, lists, dicts) can be saved") from None
            values[key] = value
    return tensors, values
