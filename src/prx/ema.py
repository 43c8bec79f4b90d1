"""Exponential moving average of the model weights (used for sampling and evaluation)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prx.distributed import local_tensor


class EMA:
    """``ema ← decay·ema + (1 − decay)·weights`` every ``update_every`` optimizer steps.

    With ``warmup`` the n-th update uses min(decay, (1 + n) / (10 + n)): a run of a few hundred
    steps would otherwise keep mostly its random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, update_every: int = 10, warmup: bool = False):
        self.decay = decay
        self.update_every = update_every
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step number ``step`` (counting from 1)."""
        if step % self.update_every:
            return
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
