"""``data.dataset: parquet``: Parquet files as downloaded (e.g. from the Hugging Face hub), read in
place through a column mapping (``data.preset`` or ``data.image_column`` / ``caption_columns`` /
``id_column``; see :mod:`prx.data.inplace`). Captions are encoded online.
"""

from __future__ import annotations

from prx.config import Config
from prx.data.mapping import mapping_from
from prx.data.sources import shards


class Source(shards.Source):
    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, pin_memory: bool = False):
        d = cfg.data
        mapping = mapping_from(d.preset, d.image_column, d.caption_columns, d.id_column)
        super().__init__(cfg, rank, world, pin_memory, mapping=mapping)
