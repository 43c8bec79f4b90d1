"""Data sources: what the trainer reads its batches from, behind one protocol.

``data.dataset: NAME`` uses the ``Source`` class of the module ``NAME`` of this package:

    shapes    the procedural shapes world (built in, any resolution, square)
    shards    prx shards (Parquet files written by ``prx data convert``)
    parquet   Parquet files as downloaded, read in place through a column mapping

A new source is one new file here whose ``Source`` implements :class:`DataSource`; it is found by
name, nothing else to register. Its settings live in the ``data:`` section below.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from prx.checks import at_least, check, one_of, positive, within

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from prx.config import Config, StageConfig
    from prx.text import TextBatch


@dataclass
class ShapesConfig:
    """The procedural shapes world (see prx.data.shapes)."""

    # relative frequency of scenes with 1, 2, 3 objects
    object_count_weights: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    seed: int = 0


@dataclass
class CaptionWeight:
    column: str = "caption"
    weight: float = at_least(1.0, 0)


@dataclass
class DataConfig:
    """``data:`` what the run trains on: a source (a module of this package) and its settings."""

    dataset: str = "shapes"  # shapes | shards | parquet (see above)
    shards: list[str] = field(default_factory=list)  # directories, files or globs of shards (or of parquet files)
    # dataset=parquet: the column mapping, as `prx data convert --from parquet` takes it
    preset: str = ""  # flux-generated | flux-reason-6m | midjourney-v6-llava
    image_column: str = ""  # the image column (bytes or a {bytes, path} struct); default the preset's, else image
    caption_columns: list[str] = field(default_factory=list)  # "field" or "field=name"; default the preset's, else caption
    id_column: str = ""  # a stable id column; default the preset's, else file name and row
    resolution: int = positive(512)
    caption_dropout: float = within(0.1, 0, 1, open_high=True)  # probability of the empty caption (enables CFG)
    # which caption column each sample uses, drawn by weight; empty = the shards' first column
    captions: list[CaptionWeight] = field(default_factory=list)
    embeddings: str = one_of("auto", "off")  # auto: precomputed embeddings of text.encoder when every shard has them
    num_workers: int = at_least(2, 0)  # DataLoader worker processes decoding images
    shuffle_window: int = at_least(16, 1)  # row groups whose samples are shuffled together
    min_aspect: float = within(0.5, 0, 1, open_low=True)  # aspect-ratio buckets (width / height) span
    max_aspect: float = at_least(2.0, 1)  # [min_aspect, max_aspect]
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    # a resumed run keeps these: its saved data position counts batches of this exact plan
    # (caption weights, dropout, workers and embeddings may change)
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("dataset", "shards", "preset", "image_column", "caption_columns",
                                                   "id_column", "shuffle_window", "min_aspect", "max_aspect", "shapes")

    def check(self, run) -> None:
        sources = available_sources()
        check(self.dataset in sources, f"data.dataset='{self.dataset}' is unknown: use {', '.join(sources)}")
        check(self.dataset == "shapes" or bool(self.shards),
              f"data.dataset={self.dataset} needs data.shards: a list of directories, files or globs"
              + (" (see `prx data convert`)" if self.dataset == "shards" else " of the downloaded .parquet files"))
        if self.preset:
            from prx.data.convert import PRESETS

            check(self.preset in PRESETS, f"data.preset='{self.preset}' is unknown: use one of {', '.join(PRESETS)}")
        check(self.dataset == "parquet" or not (self.preset or self.image_column or self.caption_columns or self.id_column),
              "data.preset / image_column / caption_columns / id_column map downloaded files: set data.dataset=parquet "
              "(prx shards need no mapping)")
        check(not self.captions or sum(c.weight for c in self.captions) > 0,
              "data.captions weights must be ≥ 0 with a positive sum")
        w = self.shapes.object_count_weights
        check(1 <= len(w) <= 3 and all(x >= 0 for x in w) and sum(w) > 0, "data.shapes.object_count_weights must "
              "be 1 to 3 non-negative weights (for 1, 2, 3 objects) with a positive sum")


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
            import torch

            from prx.text import TextBatch

            empty = torch.from_numpy(empty_embedding.copy())[None]
            self.text = self.text.with_rows_replaced(drop, TextBatch(empty, torch.ones(1, empty.shape[1], dtype=torch.bool)))
        return ["" if d else c for c, d in zip(self.captions, drop.tolist())]


class DataSource(Protocol):
    """What the trainer needs from a source. Step n's batch must depend only on (seed, n) and the
    source's saved state, so a resumed run reads exactly what the uninterrupted one would."""

    empty_embedding: np.ndarray | None  # the empty caption's precomputed encoding, when ``batch().text`` is set

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1) -> None: ...

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


def available_sources() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_source(cfg: Config, rank: int = 0, world: int = 1) -> DataSource:
    return importlib.import_module(f"{__name__}.{cfg.data.dataset}").Source(cfg, rank, world)
