"""``data.dataset: shapes``: the procedural shapes world, rendered on the fly.

Step n reads samples [offset(n), offset(n) + batch) of the world's infinite stream; rank r takes
its slice of them. The position is the step itself, so there is no state to save.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from prx.config import Config, StageConfig
from prx.config.run import SHAPES_PROMPTS
from prx.data.shapes import ShapesWorld, render
from prx.data.sources import DataBatch


class Source:
    """The shapes world as a :class:`~prx.data.sources.DataSource`."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        shapes = cfg.data.shapes
        self.worlds = {s.resolution: ShapesWorld(s.resolution, shapes.seed, "train", shapes.object_count_weights)
                       for s in cfg.stages}
        self.empty_embedding = None
        # The next step's batch renders in a thread while this step computes (PIL and numpy release the GIL
        # for most of it); a batch is a function of its step alone, so any other request renders in place.
        self.render_ahead = True
        self._ahead: ThreadPoolExecutor | None = None
        self._next: tuple[tuple[int, int, int], Future] | None = None
        # Large batches render on several threads where cores are plenty (a GPU host: 32 images at 1024 px take
        # ~0.5 s on one core, as long as a step); on a 2-core machine training keeps the cores, one thread renders.
        self.render_threads = max(1, min(8, (os.cpu_count() or 1) // 4))
        self._pool: ThreadPoolExecutor | None = None
        # for a GPU a batch is written straight into pinned memory, in the render thread: the step's copy pins nothing
        self.pin_memory = pin_memory

    def offset(self, step: int) -> int:
        offset, start = 0, 0
        for stage in self.cfg.stages:
            if step < start + stage.steps:
                return offset + (step - start) * stage.batch_size
            offset += stage.steps * stage.batch_size
            start += stage.steps
        return offset + (step - start) * self.cfg.stages[-1].batch_size

    def batch(self, step: int, stage_index: int, stage: StageConfig) -> DataBatch:
        key = (step, stage.resolution, stage.batch_size)
        if self._next is not None and self._next[0] == key:
            batch = self._next[1].result()
        else:
            batch = self._render(step, stage)
        if not self.render_ahead:
            return batch
        if self._ahead is None:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="prx-shapes")
        self._next = ((step + 1, stage.resolution, stage.batch_size), self._ahead.submit(self._render, step + 1, stage))
        return batch

    def finish_rendering(self) -> None:
        """Wait for the batch rendering ahead, if any (a benchmark: nothing of this run computes while another is
        timed)."""
        if self._next is not None:
            self._next[1].result()

    def _render(self, step: int, stage: StageConfig) -> DataBatch:
        per_rank = stage.batch_size // self.world
        first = self.offset(step) + self.rank * per_rank
        world = self.worlds[stage.resolution]
        scenes = [world.scene(i) for i in range(first, first + per_rank)]
        if self.render_threads > 1 and per_rank * stage.resolution**2 >= 8 * 256**2:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.render_threads, thread_name_prefix="prx-shapes-render")
            rendered = list(self._pool.map(lambda s: render(s, stage.resolution), scenes))
        else:
            rendered = [render(s, stage.resolution) for s in scenes]
        images = np.stack(rendered).transpose(0, 3, 1, 2)
        # numpy's copy, not torch's: a torch op in the render thread would start its own OpenMP team
        if self.pin_memory:
            batch = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            np.copyto(batch.numpy(), images)
        else:
            batch = torch.from_numpy(np.ascontiguousarray(images))
        return DataBatch(batch, [s.caption for s in scenes], [f"shapes:{first + i}" for i in range(per_rank)])

    def captions(self, count: int, seed: int) -> list[str]:
        """The sample grids' prompts: the world's fixed set (each colour, shape and position, two relations)."""
        return list(SHAPES_PROMPTS[:count])

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
