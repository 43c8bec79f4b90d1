"""TREAD token routing (Krause et al., ICCV 2025).

During training a uniformly random subset of each sample's image tokens skips blocks
``start_block..end_block`` (inclusive) and re-enters unchanged after them, so those blocks see
fewer tokens. Text tokens are never routed (they are a separate stream in PRX). The router only
chooses *which* tokens (a :class:`Route`); the model applies it (``model(..., route=...)``).

The token count comes from the batch: aspect-ratio buckets hold different grids (12×21 = 252
tokens, 13×19 = 247, ...), and every sample routes ``round(route_ratio × tokens)`` of its own
tokens. Each sample's subset is drawn from a generator seeded by (seed, step, its index in the
step's global batch), so the route does not depend on the world size, the micro-batching or a
replay of the step (activation checkpointing, resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prx.config.recipe import TreadConfig
from prx.config.rules import block_index
from prx.device import to_device


@dataclass
class Route:
    """Image tokens ``keep`` (B, K) run through blocks ``start..end`` (inclusive); the others skip them."""

    start: int
    end: int
    keep: Tensor  # (B, K) indices into the N image tokens

    def slice(self, rows: slice) -> "Route":
        """The route of a micro-batch: the same blocks, the rows' own tokens."""
        return Route(self.start, self.end, self.keep[rows])


class TREADRouter:
    def __init__(self, route_ratio: float = 0.5, start_block: int = 2, end_block: int = -2, seed: int = 0):
        if not 0.0 <= route_ratio < 1.0:
            raise ValueError(f"route_ratio must be in [0, 1), got {route_ratio}")
        self.config = TreadConfig(route_ratio, start_block, end_block)
        self.seed = seed

    @classmethod
    def from_config(cls, cfg: TreadConfig, seed: int) -> "TREADRouter | None":
        """The run's router, or None when routing is off (ratio 0)."""
        return cls(cfg.route_ratio, cfg.start_block, cfg.end_block, seed) if cfg.route_ratio > 0 else None

    @property
    def route_ratio(self) -> float:
        return self.config.route_ratio

    def blocks(self, num_layers: int) -> tuple[int, int]:
        """The (start, end) block indices, checked against the depth."""
        start, end = block_index(self.config.start_block, num_layers), block_index(self.config.end_block, num_layers)
        if start > end:
            raise ValueError(f"route start block {self.config.start_block} (= {start}) comes after end block "
                             f"{self.config.end_block} (= {end}) in a {num_layers}-block model")
        return start, end

    def num_routed(self, num_tokens: int) -> int:
        """Tokens of an image of ``num_tokens`` that skip the routed blocks: round(route_ratio × tokens)."""
        return int(round(self.route_ratio * num_tokens))

    def num_kept(self, num_tokens: int) -> int:
        return num_tokens - self.num_routed(num_tokens)

    def route(self, step: int, first: int, count: int, num_tokens: int, num_layers: int,
              device="cpu") -> Route | None:
        """The route of samples ``first .. first+count-1`` of step ``step``'s global batch, whose images
        have ``num_tokens`` tokens each; None when nothing is routed (ratio 0)."""
        seeds = [self.sample_seed(step, first + i) for i in range(count)]
        return self.fixed_route(num_tokens, num_layers, seeds, device)

    def fixed_route(self, num_tokens: int, num_layers: int, seeds: list[int], device="cpu") -> Route | None:
        """One routing per image, from its own seed (self-guidance: the same route at every sampling step,
        and image i's route does not depend on the batch it is sampled in)."""
        start, end = self.blocks(num_layers)
        kept = self.num_kept(num_tokens)
        if kept == num_tokens:
            return None
        keep = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)).argsort()[:kept].sort().values
                for s in seeds]  # a uniform random subset per sample, in token order

        return Route(start, end, to_device(torch.stack(keep), torch.device(device)))

    def sample_seed(self, step: int, sample: int) -> int:
        return (self.seed * 1_000_003 + step * 104_729 + sample * 7_919 + 0x9E3779B9) % (2**63 - 1)
