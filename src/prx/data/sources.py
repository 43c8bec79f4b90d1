"""What the trainer reads from: the procedural shapes world, prx shards or downloaded Parquet files,
behind one interface.

``source.batch(step, stage_index, stage)`` returns the rank's batch of that step as a
:class:`~prx.data.loader.DataBatch` (uint8 images, captions, maybe precomputed embeddings);
``state_dict()`` / ``load_state_dict()`` carry the exact position through checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch

from prx.config import Config, StageConfig
from prx.data.buckets import bucket_indices, make_buckets
from prx.data.convert import mapping_from
from prx.data.loader import DataBatch, ShardLoader
from prx.data.shapes import ShapesWorld, render
from prx.data.shards import encoder_tag, expand_shards, sidecar_path
from prx.errors import PrxError


class ShapesSource:
    """Step n reads samples [offset(n), offset(n) + batch) of the infinite procedural stream;
    rank r takes its slice of them. The position is the step itself."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        shapes = cfg.data.shapes
        self.worlds = {s.resolution: ShapesWorld(s.resolution, shapes.seed, "train", shapes.object_count_weights)
                       for s in cfg.stages}
        self.empty_embedding = None

    def offset(self, step: int) -> int:
        offset, start = 0, 0
        for stage in self.cfg.stages:
            if step < start + stage.steps:
                return offset + (step - start) * stage.batch_size
            offset += stage.steps * stage.batch_size
            start += stage.steps
        return offset + (step - start) * self.cfg.stages[-1].batch_size

    def batch(self, step: int, stage_index: int, stage: StageConfig) -> DataBatch:
        per_rank = stage.batch_size // self.world
        first = self.offset(step) + self.rank * per_rank
        world = self.worlds[stage.resolution]
        scenes = [world.scene(i) for i in range(first, first + per_rank)]
        images = torch.from_numpy(np.stack([render(s, stage.resolution) for s in scenes]))
        return DataBatch(images.permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes],
                         [f"shapes:{first + i}" for i in range(per_rank)])

    def sizes(self, stage: StageConfig) -> list[tuple[int, int]]:
        """(width, height) of the stage's images, most common first: the world renders squares."""
        return [(stage.resolution, stage.resolution)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def skipped(self) -> dict:
        return {}


class ShardSource:
    def __init__(self, cfg: Config, rank: int = 0, world: int = 1):
        d = cfg.data
        shards = expand_shards(d.shards)
        tag = encoder_tag(cfg.text.encoder, cfg.text.max_length)
        mapping = None
        if d.dataset == "parquet":  # files as downloaded: read in place, captions encoded online
            mapping = mapping_from(d.preset, d.image_column, d.caption_columns, d.id_column)
        use_embeddings = mapping is None and d.embeddings == "auto" and all(sidecar_path(p, tag).exists() for p in shards)
        weights = {c.column: c.weight for c in d.captions}
        self.loader = ShardLoader(shards, cfg.model.patch_size, cfg.train.seed, weights, d.num_workers, rank, world,
                                  d.shuffle_window, (d.min_aspect, d.max_aspect), tag if use_embeddings else None,
                                  mapping)
        self.world = world
        self.patch, self.aspect_range = cfg.model.patch_size, (d.min_aspect, d.max_aspect)
        self.empty_embedding = self.loader.empty_embedding

    def batch(self, step: int, stage_index: int, stage: StageConfig) -> DataBatch:
        if stage.batch_size % self.world:
            raise PrxError(f"batch size {stage.batch_size} is not divisible by the {self.world} ranks")
        self.loader.set_stage(stage_index, stage.resolution, stage.batch_size // self.world)
        return self.loader.next()

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


def build_source(cfg: Config, rank: int = 0, world: int = 1):
    return ShapesSource(cfg, rank, world) if cfg.data.dataset == "shapes" else ShardSource(cfg, rank, world)
