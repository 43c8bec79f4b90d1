"""TREAD token routing (Krause et al., ICCV 2025).

During training a uniformly random subset of each sample's image tokens skips blocks
``start_block..end_block`` (inclusive) and re-enters unchanged after them, so those blocks see
fewer tokens. Text tokens are never routed (they are a separate stream in PRX). The router only
chooses *which* tokens; the model applies the route (``model(..., route=...)``).

The token count comes from the batch: aspect-ratio buckets hold different grids (12×21 = 252
tokens, 13×19 = 247, ...), and every sample routes ``round(route_ratio × tokens)`` of its own
tokens. Each sample's subset is drawn from a generator seeded by (seed, step, its index in the
step's global batch), so the route does not depend on the world size, the micro-batching or a
replay of the step (activation checkpointing, resume).
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

    def num_routed(self, num_tokens: int) -> int:
        """Tokens of an image of ``num_tokens`` that skip the routed blocks: round(route_ratio × tokens)."""
        return int(round(self.route_ratio * num_tokens))

    def num_kept(self, num_tokens: int) -> int:
        return num_tokens - self.num_routed(num_tokens)

    def route(self, step: int, first: int, count: int, num_tokens: int, num_layers: int,
              device: torch.device | str = "cpu") -> Route | None:
        """The route of samples ``first .. first+count-1`` of step ``step``'s global batch, whose images
        have ``num_tokens`` tokens each; None when nothing is routed (ratio 0)."""
        seeds = [self.sample_seed(step, first + i) for i in range(count)]
        return self._route(num_tokens, num_layers, seeds, device)

    def fixed_route(self, num_tokens: int, num_layers: int, seeds: list[int], device="cpu") -> Route | None:
        """One routing per image, from its own seed (self-guidance: the same route at every sampling step,
        and image i's route does not depend on the batch it is sampled in)."""
        return self._route(num_tokens, num_layers, seeds, device)

    def _route(self, num_tokens: int, num_layers: int, seeds: list[int], device) -> Route | None:
        start, end = self.blocks(num_layers)
        kept = self.num_kept(num_tokens)
        if kept == num_tokens:
            return None
        keep = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)).argsort()[:kept].sort().values
                for s in seeds]  # a uniform random subset per sample, in token order
        return Route(start, end, torch.stack(keep).to(device))

    def sample_seed(self, step: int, sample: int) -> int:
        return (self.seed * 1_000_003 + step * 104_729 + sample * 7_919 + 0x9E3779B9) % (2**63 - 1)
