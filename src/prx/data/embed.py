"""``prx data embed``: precompute caption embeddings into sidecar files next to each shard.

For every shard and caption column the configured text encoder runs once (batched, in bf16 on a
GPU), and ``NAME.emb-TAG.parquet`` is written atomically beside ``NAME.parquet``, row-aligned and
with the same row groups. A shard whose sidecar exists is skipped, so an interrupted run resumes;
under ``torchrun`` (or with ``--rank`` / ``--world-size``) each rank takes every world-size-th
shard. Training finds the sidecars for its ``text.encoder`` and ``text.max_length`` and skips the
encoder for the training captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from prx.data.shards import caption_columns_of, encoder_tag, expand_shards, sidecar_path, write_sidecar
from prx.text import TextEncoder


def embed_shards(shards: list[str] | list[Path], encoder: TextEncoder, columns: list[str] | None = None,
                 batch_size: int = 64, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    paths = expand_shards([str(s) for s in shards])
    tag = encoder_tag(encoder.name, encoder.max_length, encoder.num_layers)
    mine = paths[rank::world_size]
    todo = [p for p in mine if not sidecar_path(p, tag).exists()]
    empty = encoder._encode_uncached([""])[0].numpy()
    stats = {"tag": tag, "shards": len(mine), "skipped_existing": len(mine) - len(todo), "captions": 0}
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc="embed", unit="shard", disable=not progress,
              dynamic_ncols=True) as bar:  # closed however the loop ends: an error prints on a line of its own
        for path in todo:
            file = pq.ParquetFile(path)
            available = caption_columns_of(path)
            wanted = [c for c in (columns or available) if c in available]
            table = file.read(columns=["id"] + wanted)
            out: dict[str, list[np.ndarray]] = {}
            for column in wanted:
                texts = [t if isinstance(t, str) else "" for t in table.column(column).to_pylist()]
                encoded: list[np.ndarray] = []
                for start in range(0, len(texts), batch_size):
                    encoded += [e.numpy() for e in encoder._encode_uncached(texts[start:start + batch_size])]
                out[column] = encoded
                stats["captions"] += len(texts)
            groups = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
            write_sidecar(sidecar_path(path, tag), table.column("id").to_pylist(), out, encoder.name,
                          encoder.max_length, empty, groups)
            bar.update(1)
    return stats
