"""TREAD token routing (Krause et al., ICCV 2025).

During training a uniformly random subset of each sample's image tokens skips blocks
``start_block..end_block`` (inclusive) and re-enters unchanged after them, so those blocks see
fewer tokens. Text tokens are never routed (they are a separate stream in PRX). The router only
chooses *which* tokens; the model applies the route (``model(..., route=...)``).

The choice is a pure function of (seed, step, rank), so activation checkpointing, resume and a
replayed step route exactly the same tokens.
"""

from __future__ import annotations

import torch

from prx.model import Route


class TREADRouter:
    def __init__(self, route_ratio: float = 0.5, start_block: int = 2, end_block: int = -2, seed: int = 0):
        if not 0.0 <= route_ratio < 1.0:
            raise ValueError(f"route_ratio must be in [0, 1), got {route_ratio}")
        self.route_ratio = route_ratio
        self.start_block = start_block
        self.end_block = end_block
        self.seed = seed

    def blocks(self, num_layers: int) -> tuple[int, int]:
        """The (start, end) block indices, negative ones counted from the end, checked against depth."""
        start, end = self.start_block % num_layers, self.end_block % num_layers
        if not (-num_layers <= self.start_block < num_layers and -num_layers <= self.end_block < num_layers):
            raise ValueError(f"route blocks {self.start_block}..{self.end_block} are outside a {num_layers}-block model")
        if start > end:
            raise ValueError(
                f"route start block {self.start_block} (= {start}) comes after end block {self.end_block} (= {end}) "
                f"in a {num_layers}-block model"
            )
        return start, end

    def num_kept(self, num_tokens: int) -> int:
        return num_tokens - int(round(self.route_ratio * num_tokens))

    def route(self, batch: int, num_tokens: int, num_layers: int, step: int, rank: int = 0,
              device: torch.device | str = "cpu") -> Route | None:
        """The route for one training step; None when nothing is routed (ratio 0)."""
        start, end = self.blocks(num_layers)
        kept = self.num_kept(num_tokens)
        if kept == num_tokens:
            return None
        generator = torch.Generator().manual_seed(self.step_seed(step, rank))
        scores = torch.rand(batch, num_tokens, generator=generator)
        keep = scores.argsort(dim=1)[:, :kept].sort(dim=1).values  # a uniform random subset per sample
        return Route(start, end, keep.to(device))

    def fixed_route(self, num_tokens: int, num_layers: int, seeds: list[int], device="cpu") -> Route | None:
        """One routing per image, from its own seed (self-guidance: the same route at every sampling step,
        and image i's route does not depend on the batch it is sampled in)."""
        start, end = self.blocks(num_layers)
        kept = self.num_kept(num_tokens)
        if kept == num_tokens:
            return None
        keep = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)).argsort()[:kept].sort().values
                for s in seeds]
        return Route(start, end, torch.stack(keep).to(device))

    def step_seed(self, step: int, rank: int) -> int:
        return (self.seed * 1_000_003 + step * 104_729 + rank * 7_919 + 0x9E3779B9) % (2**63 - 1)
