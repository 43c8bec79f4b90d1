"""Data sources: what the trainer reads its batches from, behind one protocol.

``data.dataset: NAME`` uses the ``Source`` class of the module ``NAME`` of this package:

    shapes    the procedural shapes world (built in, any resolution, square)
    shards    prx shards (Parquet files written by ``prx data convert``)
    parquet   Parquet files as downloaded, read in place through a column mapping

A new source is one new file here whose ``Source`` implements :class:`DataSource`; it is found by
name, nothing else to register. Its settings live in the ``data:`` section (:mod:`prx.config.data`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from prx.config import Config, StageConfig
from prx.config.run import NUM_DATA_PROMPTS
from prx.data.index import ShardIndex, sample_captions
from prx.data.shards import expand_shards
from prx.text import TextBatch


@dataclass
class DataBatch:
    """A rank's samples of one step, all of one shape (one aspect-ratio bucket)."""

    images: Tensor  # uint8 (B, 3, H, W)
    captions: list[str]
    ids: list[str] = field(default_factory=list)
    text: TextBatch | None = None  # precomputed caption embeddings, when the data carries them
    position: tuple[int, int] | None = None  # (epoch, batch index) of this batch in the plan
    skipped: dict[str, int] = field(default_factory=dict)  # reason → samples replaced in this batch
    damaged: list[str] = field(default_factory=list)  # data files found damaged while loading it (warned once)

    def drop_captions(self, drop: Tensor, empty_embedding: np.ndarray | None) -> list[str]:
        """Caption dropout: the ``drop`` (bool, (B,)) rows get the empty caption (and its precomputed
        encoding, when the batch carries encodings); returns the captions to encode."""
        if self.text is not None and empty_embedding is not None:
            empty = torch.from_numpy(empty_embedding.copy())[None]
            mask = torch.ones(1, empty.shape[1], dtype=torch.bool)
            self.text = self.text.with_rows_replaced(drop, TextBatch(empty, mask))
        return ["" if d else c for c, d in zip(self.captions, drop.tolist())]


class DataSource(Protocol):
    """What the trainer needs from a source. Step n's batch must depend only on (seed, n) and the
    source's saved state, so a resumed run reads exactly what the uninterrupted one would."""

    empty_embedding: np.ndarray | None  # the empty caption's precomputed encoding, when ``batch().text`` is set

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False) -> None: ...

    def batch(self, step: int, stage_index: int, stage: StageConfig) -> DataBatch:
        """This rank's samples of step ``step`` (``stage.batch_size // world`` of them)."""

    def sizes(self, stage: StageConfig) -> list[tuple[int, int]]:
        """(width, height) of the stage's image shapes that hold data, most common first."""

    def state_dict(self) -> dict:
        """The exact position, saved in every checkpoint (JSON-serialisable)."""

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def skipped(self) -> dict[str, int]:
        """Samples that could not be loaded (and were replaced), by reason, since the run began."""

    def captions(self, count: int, seed: int) -> list[str]:
        """Up to ``count`` of the data's captions, chosen by ``seed``: the sample grids' prompts."""


def available_sources() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_source(cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False) -> DataSource:
    """The run's ``data.dataset`` source; ``pin_memory``: batches for a GPU are made in pinned memory."""
    return importlib.import_module(f"{__name__}.{cfg.data.dataset}").Source(cfg, rank, world, pin_memory=pin_memory)


def sample_prompts(cfg: Config, source: DataSource) -> list[str]:
    """The prompts of a run's sample grids: ``logging.sample_prompts`` when the config gives them; else the data's
    own: the shapes world's prompts, or captions of the held-out shards (``eval.data``), else of the training data."""
    if cfg.logging.sample_prompts is not None:
        return list(cfg.logging.sample_prompts)
    if cfg.eval.data and cfg.data.dataset != "shapes":
        index = ShardIndex(expand_shards(cfg.eval.data), progress=False)
        return sample_captions(index, NUM_DATA_PROMPTS, cfg.sampling.seed, cfg.eval.caption_column)
    return source.captions(NUM_DATA_PROMPTS, cfg.sampling.seed) if hasattr(source, "captions") else []
