"""Optimizers and the learning-rate schedule: ``torch.optim.Muon`` for the 2D block matrices plus
Adam for everything else, or plain AdamW; warm-up, constant, then an optional linear decay.

Param groups are the seed's list of dicts, accepted as written::

    [{"params": model.muon_params, "optimizer": "muon", "lr": 1e-4, "momentum": 0.95,
      "nesterov": True, "ns_steps": 5, "rms_scale": True},
     {"params": model.adam_params, "optimizer": "adam", "lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8}]

``rms_scale=True`` scales each Muon update to the RMS of an Adam update, 0.2·√max(m, n)
(``adjust_lr_fn="match_rms_adamw"``), so both groups share one learning rate. Each group keeps
its configured LR as ``base_lr``; the schedule multiplies it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from prx.config.recipe import OptimizerConfig
from prx.errors import ConfigError
from prx.muon import Muon  # torch.optim.Muon, orthogonalising in fp32 on CPUs without fast bf16


def decay_start(total_steps: int, cfg: OptimizerConfig) -> int:
    """The first step of the LR decay (``total_steps`` when there is none)."""
    return total_steps - int(round(cfg.decay_fraction * total_steps))


def lr_scale(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """The LR schedule: linear warm-up, constant, then (optionally) a linear decay over the last
    ``decay_fraction`` of the run to ``min_lr_ratio``. Multiplies every group's base LR."""
    scale = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    start = decay_start(total_steps, cfg)
    if start < total_steps and step >= start:
        progress = (step - start + 1) / (total_steps - start)
        scale *= 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return scale


MUON_KEYS = {"lr", "momentum", "nesterov", "ns_steps", "rms_scale", "weight_decay", "eps", "ns_coefficients"}
ADAM_KEYS = {"lr", "betas", "eps", "weight_decay"}


class MultiOptimizer:
    """Several optimizers stepped as one (torch.optim.Muon only takes 2D parameters)."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_scale(self, scale: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * scale



def _muon(group: dict[str, Any], compiled: bool = False, ns_dtype: torch.dtype | None = None):
    params = list(group["params"])
    bad = [tuple(p.shape) for p in params if p.ndim != 2]
    if bad:
        raise ConfigError(f"Muon takes 2D matrices only, got parameters of shape {bad[:3]}: put them in the Adam group")
    kwargs = dict(
        lr=group.get("lr", 1e-4), weight_decay=group.get("weight_decay", 0.0), momentum=group.get("momentum", 0.95),
        nesterov=group.get("nesterov", True), ns_steps=group.get("ns_steps", 5), eps=group.get("eps", 1e-7),
        adjust_lr_fn="match_rms_adamw" if group.get("rms_scale", True) else "original",
    )
    if "ns_coefficients" in group:
        kwargs["ns_coefficients"] = tuple(group["ns_coefficients"])
    return Muon(params, ns_dtype=ns_dtype, compiled=compiled, **kwargs)


def _adam(groups: list[dict[str, Any]]):
    torch_groups = [
        {"params": list(g["params"]), "lr": g.get("lr", 1e-4), "betas": tuple(g.get("betas", (0.9, 0.95))),
         "eps": g.get("eps", 1e-8), "weight_decay": g.get("weight_decay", 0.0)}
        for g in groups
    ]
    # fused: one kernel for all parameters (CPU and CUDA); on the CPU demo 4× faster than the per-parameter loop
    return torch.optim.AdamW(torch_groups, fused=True)


def build_optimizer(param_groups: Iterable[dict[str, Any]], extra_adam_params: list = (),
                    compile_muon: bool = False, ns_dtype: torch.dtype | None = None) -> MultiOptimizer:
    """Build from seed-style param-group dicts. ``extra_adam_params`` (e.g. the REPA projector)
    join the Adam optimizer with the first Adam group's settings. ``compile_muon``: Muon's memory-bound
    work in compiled passes; ``ns_dtype``: its Newton–Schulz dtype (both from :mod:`prx.execution`; None: the
    parameters' device's fast one)."""
    muon_groups, adam_groups = [], []
    for i, group in enumerate(param_groups):
        kind = str(group.get("optimizer", "adam")).lower()
        allowed = {"muon": MUON_KEYS, "adam": ADAM_KEYS, "adamw": ADAM_KEYS}.get(kind)
        if allowed is None:
            raise ConfigError(f"param group {i}: optimizer '{kind}' is unknown: use 'muon' or 'adam'")
        unknown = set(group) - allowed - {"params", "optimizer"}
        if unknown:
            raise ConfigError(f"param group {i} ({kind}): unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if group.get("lr", 1e-4) <= 0:
            raise ConfigError(f"param group {i} ({kind}): lr must be positive, got {group['lr']}")
        (muon_groups if kind == "muon" else adam_groups).append(group)
    if extra_adam_params:
        template = adam_groups[0] if adam_groups else {"lr": muon_groups[0].get("lr", 1e-4) if muon_groups else 1e-4}
        adam_groups.append({**{k: v for k, v in template.items() if k != "params"}, "params": list(extra_adam_params)})
    muon_groups = [{**g, "params": list(g["params"])} for g in muon_groups]
    adam_groups = [{**g, "params": list(g["params"])} for g in adam_groups]
    seen: set[int] = set()
    for g in muon_groups + adam_groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ConfigError("a parameter appears in two param groups: each must be in exactly one")
            seen.add(id(p))
    optimizers = [_muon(g, compile_muon, ns_dtype) for g in muon_groups if g["params"]]
    adam_groups = [g for g in adam_groups if g["params"]]
    if adam_groups:
        optimizers.append(_adam(adam_groups))
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return MultiOptimizer(optimizers)


def param_groups_from_config(model, cfg: OptimizerConfig, adamw_only: bool = False) -> list[dict[str, Any]]:
    """The recipe's split (Muon for model.muon_params, Adam for the rest) or one AdamW group (``optimizer.name:
    adamw``, or ``adamw_only``: a LoRA run's adapters), of the parameters that train."""
    adam = {"optimizer": "adam", "lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps,
            "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw" or adamw_only:
        return [{**adam, "params": [p for p in model.parameters() if p.requires_grad]}]
    return [
        {"params": model.muon_params, "optimizer": "muon", "lr": cfg.muon_lr or cfg.lr, "momentum": cfg.muon_momentum,
         "nesterov": cfg.muon_nesterov, "ns_steps": cfg.muon_ns_steps, "rms_scale": cfg.muon_rms_scale,
         "weight_decay": cfg.weight_decay},
        {**adam, "params": model.adam_params},
    ]
