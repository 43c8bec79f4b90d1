"""Training on Parquet files as downloaded (e.g. from the Hugging Face hub), read in place.

A column mapping (:class:`~prx.data.convert.Mapping`, the same presets as ``prx data convert``)
says which column is the image (raw bytes or a ``{bytes, path}`` struct), which columns are
captions, and which is the id. The loader plans with every row's displayed size: taken from
integer ``width`` / ``height`` columns when the file has them, else read from each image's header
once and cached under ``$PRX_CACHE/sizes`` (keyed by the file's path, size and mtime). A row whose
image cannot even be probed gets size 0 and the index leaves it out (counted).

Converting is still the faster path: downloaded files keep their own row groups (100 large images
in a Hugging Face image dataset), so a worker reads more than it uses; prx shards use 32-row
groups with the image bytes stored uncompressed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from prx.data.convert import check_columns, image_bytes, open_parquet
from prx.data.imageio import BadImage, probe
from prx.data.mapping import Mapping
from prx.data.shards import ShardInfo, shard_info
from prx.files import cache_root


def _cache_path(path: Path, image_column: str) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{image_column}"
    return cache_root() / "sizes" / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.npy"


def _stored_sizes(file: pq.ParquetFile) -> np.ndarray | None:
    schema = file.schema_arrow
    if all(n in schema.names and pa.types.is_integer(schema.field(n).type) for n in ("width", "height")):
        table = file.read(columns=["width", "height"])
        return np.stack([table.column("width").to_numpy(zero_copy_only=False),
                         table.column("height").to_numpy(zero_copy_only=False)], 1).astype(np.int32)
    return None


def _probe_sizes(file: pq.ParquetFile, image_column: str, bar: tqdm) -> np.ndarray:
    sizes = np.zeros((file.metadata.num_rows, 2), np.int32)
    row = 0
    for batch in file.iter_batches(batch_size=64, columns=[image_column]):
        for value in batch.column(0).to_pylist():
            try:
                sizes[row] = probe(image_bytes(value))[:2]
            except (BadImage, TypeError):
                pass  # stays 0 × 0: left out of the index
            row += 1
        bar.update(batch.num_rows)
    return sizes


def read_inplace_infos(paths: list[Path], mapping: Mapping, progress: bool = True) -> list[ShardInfo]:
    """The loader's index entries of downloaded Parquet files; probes (and caches) missing sizes."""
    files = [open_parquet(path) for path in paths]
    for path, file in zip(paths, files):
        check_columns(path, file.schema_arrow.names, mapping,
                      "set data.preset, or data.image_column / data.caption_columns / data.id_column")
    sizes: list[np.ndarray | None] = []
    for path, file in zip(paths, files):
        stored = _stored_sizes(file)
        cache = _cache_path(path, mapping.image)
        sizes.append(stored if stored is not None else (np.load(cache) if cache.exists() else None))
    todo = [i for i, s in enumerate(sizes) if s is None]
    if todo:
        total = sum(files[i].metadata.num_rows for i in todo)
        with tqdm(total=total, desc=f"reading image sizes of {len(todo)} file(s) (cached for next time)", unit="img",
                  disable=not progress, dynamic_ncols=True) as bar:
            for i in todo:
                sizes[i] = _probe_sizes(files[i], mapping.image, bar)
                cache = _cache_path(paths[i], mapping.image)
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.stem}.tmp{os.getpid()}.npy")
                np.save(tmp, sizes[i])
                os.replace(tmp, cache)  # atomic: ranks probing the same file at once both write whole files
    return [shard_info(path, file, size[:, 0], size[:, 1], mapping.caption_columns)
            for path, file, size in zip(paths, files, sizes)]
