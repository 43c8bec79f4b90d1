"""Exponential moving average of the model weights (used for sampling and evaluation)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from prx.checks import at_least, within

# torch is imported where it is used: this module's config is read before any heavy import


@dataclass
class EMAConfig:
    """``ema:`` ema ← decay·ema + (1 − decay)·weights every ``update_every`` optimizer steps."""

    decay: float = within(0.999, 0, 1, open_high=True)
    update_every: int = at_least(10, 1)
    # decay_n = min(decay, (1+n)/(10+n)) over the n-th update: short runs need it
    warmup: bool = False


class EMA:
    """A frozen copy of the model, updated from it every ``update_every`` optimizer steps.

    With ``warmup`` the n-th update uses min(decay, (1 + n) / (10 + n)): a run of a few hundred
    steps would otherwise keep mostly its random initialisation.
    """

    def __init__(self, model, decay: float = 0.999, update_every: int = 10, warmup: bool = False):
        self.config = EMAConfig(decay, update_every, warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @classmethod
    def from_config(cls, model, cfg: EMAConfig) -> "EMA":
        return cls(model, cfg.decay, cfg.update_every, cfg.warmup)

    def current_decay(self) -> float:
        c = self.config
        return min(c.decay, (1 + self.num_updates) / (10 + self.num_updates)) if c.warmup else c.decay

    def update(self, model, step: int) -> None:
        """Call after optimizer step number ``step`` (counting from 1)."""
        import torch

        from prx.distributed import local_tensor

        if step % self.config.update_every:
            return
        with torch.no_grad():
            # local shards under FSDP2 (both models are sharded alike), whole tensors otherwise
            ema_params = [local_tensor(p) for p in self.model.parameters()]
            params = [local_tensor(p.detach()) for p in model.parameters()]
            torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay())
            for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
                ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
