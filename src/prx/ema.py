"""Exponential moving average of the model weights (used for sampling and evaluation)."""

from __future__ import annotations

import copy

import torch

from prx.config.recipe import EMAConfig
from prx.distributed import local_tensor


class EMA:
    """A frozen copy of the model, updated from it every ``update_every`` optimizer steps.

    With ``warmup`` the n-th update uses min(decay, (1 + n) / (10 + n)): a run of a few hundred
    steps would otherwise keep mostly its random initialisation.

    ``decay: 0`` with ``update_every: 1`` (the CPU demo) makes the copy equal the weights after every
    step: it is then made when the copy is read (sampling, saving), not every step (about 0.6% of the
    demo's step on an AVX2 CPU).

    A model with frozen parameters (a LoRA run's base) shares them with its copy: only what trains is averaged and
    saved (the adapters: megabytes, where a second copy of a 7B base would be 14 GB).
    """

    def __init__(self, model, decay: float = 0.999, update_every: int = 10, warmup: bool = False):
        self.config = EMAConfig(decay, update_every, warmup)
        self.num_updates = 0
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self._model = copy.deepcopy(model, memo=dict(frozen)).requires_grad_(False).eval()
        # the averaged parameters' names: all of them, or what trains where part of the model is frozen
        self.averaged = {name for name, p in model.named_parameters() if p.requires_grad}
        self.shares_frozen = bool(frozen)
        self._copy_pending_from = None  # the live model whose weights the copy owes (decay 0, every step)

    @property
    def model(self):
        """The averaged model (what sampling, evaluation and checkpoints read)."""
        self._make_pending_copy()
        return self._model

    def _make_pending_copy(self) -> None:
        if self._copy_pending_from is not None:
            source, self._copy_pending_from = self._copy_pending_from, None
            self._blend(source, 1.0)

    @classmethod
    def from_config(cls, model, cfg: EMAConfig) -> "EMA":
        return cls(model, cfg.decay, cfg.update_every, cfg.warmup)

    def current_decay(self) -> float:
        c = self.config
        return min(c.decay, (1 + self.num_updates) / (10 + self.num_updates)) if c.warmup else c.decay

    def update(self, model, step: int) -> None:
        """Call after optimizer step number ``step`` (counting from 1)."""
        if step % self.config.update_every:
            return
        weight = 1.0 - self.current_decay()
        if weight == 1.0 and self.config.update_every == 1:
            self._copy_pending_from = model  # a plain copy after every step: made when read
        else:
            self._make_pending_copy()
            self._blend(model, weight)
        self.num_updates += 1

    def _blend(self, model, weight: float) -> None:
        """ema ← ema + weight·(weights − ema); buffers are copied."""
        with torch.no_grad():
            # local shards under FSDP2 (both models are sharded alike), whole tensors otherwise
            pairs = [(e, p) for e, p in zip(self._model.parameters(), model.parameters()) if p.requires_grad]
            ema_params = [local_tensor(e) for e, _ in pairs]
            params = [local_tensor(p.detach()) for _, p in pairs]
            torch._foreach_lerp_(ema_params, params, weight)
            for ema_buf, buf in zip(self._model.buffers(), model.buffers()):
                ema_buf.copy_(buf)

    def state_dict(self) -> dict:
        """The averaged weights (with the buffers; a model with a frozen part: its trained parameters only)."""
        weights = self.model.state_dict()
        if self.shares_frozen:
            weights = {k: v for k, v in weights.items() if k in self.averaged}
        return {"model": weights, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self._copy_pending_from = None
        self._model.load_state_dict(state["model"], strict=not self.shares_frozen)
        self.num_updates = int(state["num_updates"])
