"""``data.dataset: shards``: prx shards (Parquet files written by ``prx data convert``), through the
bucketed, exactly resumable loader of :mod:`prx.data.loader`. Uses precomputed caption embeddings
when every shard has them for the run's text encoder (``data.embeddings: auto``).
"""

from __future__ import annotations

import numpy as np

from prx.config import Config, StageConfig
from prx.data.buckets import bucket_indices, make_buckets
from prx.data.index import sample_captions
from prx.data.loader import ShardLoader
from prx.data.mapping import Mapping
from prx.data.shards import encoder_tag, expand_shards, sidecar_path
from prx.data.sources import DataBatch
from prx.errors import PrxError


class Source:
    """Shards (or, with a ``mapping``, downloaded Parquet files) as a :class:`~prx.data.sources.DataSource`."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False,
                 mapping: Mapping | None = None):
        d = cfg.data
        shards = expand_shards(d.shards)
        tag = encoder_tag(cfg.text.encoder, cfg.text.max_length, cfg.text.num_layers)
        embedded = all(sidecar_path(p, tag).exists() for p in shards)
        use_embeddings = mapping is None and d.embeddings == "auto" and embedded
        weights = {c.column: c.weight for c in d.captions}
        self.caption_column = next((c for c, w in weights.items() if w > 0), None)
        self.loader = ShardLoader(shards, cfg.model.patch_size, cfg.train.seed, weights, d.num_workers, rank, world,
                                  d.shuffle_window, (d.min_aspect, d.max_aspect), tag if use_embeddings else None,
                                  mapping, cfg.text.min_length, d.sharding)
        self.world = world
        for i, stage in enumerate(cfg.stages):  # a stage without a full batch fails now, not when it starts
            key = f"train.stages[{i}].batch_size" if cfg.train.stages else "train.batch_size"
            self.loader.planner_for(i, stage.resolution, stage.batch_size // world).check(key)
        self.patch, self.aspect_range = cfg.model.patch_size, (d.min_aspect, d.max_aspect)
        self.empty_embedding = self.loader.empty_embedding

    def batch(self, step: int, stage_index: int, stage: StageConfig) -> DataBatch:
        if stage.batch_size % self.world:
            raise PrxError(f"batch size {stage.batch_size} is not divisible by the {self.world} ranks")
        self.loader.set_stage(stage_index, stage.resolution, stage.batch_size // self.world)
        return self.loader.next()

    def captions(self, count: int, seed: int) -> list[str]:
        """Captions of ``count`` samples chosen by ``seed`` (the first caption column of ``data.captions``, else the
        shards'): the prompts of the run's sample grids when it has no held-out data."""
        return sample_captions(self.loader.index, count, seed, self.caption_column)

    def sizes(self, stage: StageConfig) -> list[tuple[int, int]]:
        """(width, height) of the stage's aspect-ratio buckets that hold data, most common first."""
        buckets = make_buckets(stage.resolution, self.patch, *self.aspect_range)
        counts = np.bincount(bucket_indices(self.loader.index.width, self.loader.index.height, buckets),
                             minlength=len(buckets))
        return [(buckets[i].width, buckets[i].height) for i in np.argsort(-counts, kind="stable") if counts[i]]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    @property
    def skipped(self) -> dict:
        return dict(self.loader.skipped)

    def close(self) -> None:
        """Stop the loader's worker processes (the trainer calls it when the run ends)."""
        self.loader.close()
