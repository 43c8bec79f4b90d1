"""The shard format: Parquet files read with pyarrow.

One row per sample:

| column | type | |
|---|---|---|
| ``id`` | string | stable sample id (the source path or key) |
| ``image`` | binary | the image file's bytes as stored (JPEG, PNG, WebP, …), uncompressed by Parquet |
| ``width``, ``height`` | int32 | the displayed size (EXIF rotation applied) |
| ``format`` | string | ``JPEG``, ``PNG``, ``WEBP``, … |
| ``source`` | string | where the sample came from (input file) |
| caption columns | string | one or more, e.g. ``caption``, ``prompt``, ``enhanced_prompt`` |

Schema metadata ``prx.captions`` lists the caption columns. Row groups are small (32 rows by
default) so the loader can read a random sample without reading much else.

Precomputed text embeddings live in sidecar files next to a shard,
``NAME.emb-TAG.parquet`` (``TAG`` names the encoder and length), row-aligned with the shard:
``id``, and per caption column ``COL`` (fp16 bytes of an (L, D) array) and ``COL.len`` (L).
Their metadata holds the encoder, the width, and the empty caption's encoding.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prx.errors import PrxError

SCHEMA_VERSION = "1"
BASE_COLUMNS = ("id", "image", "width", "height", "format", "source")
ROWS_PER_GROUP = 32


def shard_schema(caption_columns: list[str]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()), pa.field("image", pa.binary()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("format", pa.string()), pa.field("source", pa.string()),
    ] + [pa.field(c, pa.string()) for c in caption_columns]
    meta = {"prx.schema": SCHEMA_VERSION, "prx.captions": json.dumps(caption_columns)}
    return pa.schema(fields, metadata=meta)


def write_shard(path: str | Path, rows: list[dict], caption_columns: list[str],
                rows_per_group: int = ROWS_PER_GROUP) -> int:
    """Write ``rows`` to ``path`` atomically (temporary file, then rename); returns bytes written."""
    path = Path(path)
    schema = shard_schema(caption_columns)
    table = pa.Table.from_pylist(
        [{**{k: r.get(k) for k in BASE_COLUMNS}, **{c: r.get(c) for c in caption_columns}} for r in rows],
        schema=schema)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    compression = {name: ("NONE" if name == "image" else "ZSTD") for name in schema.names}
    pq.write_table(table, tmp, row_group_size=rows_per_group, compression=compression)
    os.replace(tmp, path)
    return path.stat().st_size


def caption_columns_of(path: str | Path) -> list[str]:
    meta = pq.read_schema(path).metadata or {}
    if b"prx.captions" in meta:
        return json.loads(meta[b"prx.captions"])
    raise PrxError(f"{path} is not a prx shard (no prx.captions metadata): convert it with `prx data convert`, "
                   f"or read it in place with a column mapping (data.dataset=parquet and data.preset, or "
                   f"`prx data inspect --preset`)")


def expand_shards(patterns: list[str] | str) -> list[Path]:
    """Shard files from paths, directories (their *.parquet) and globs, sorted, sidecars excluded."""
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            matches = glob.glob(os.path.join(pattern, "**", "*.parquet"), recursive=True)
        else:
            matches = glob.glob(pattern, recursive=True)
        if not matches:
            raise PrxError(f"no shards found at '{pattern}': give a directory of .parquet shards, a file or a glob")
        found += [Path(m) for m in matches]
    shards = sorted({p for p in found if ".emb-" not in p.name and not p.name.startswith(".")})
    if not shards:
        raise PrxError(f"only sidecar or hidden files at {patterns}: point to the shards themselves")
    return shards


# --------------------------------------------------------------------------------------------
# Embedding sidecars
# --------------------------------------------------------------------------------------------


def encoder_tag(encoder: str, max_length: int, num_layers: int | None = None) -> str:
    """The sidecar's name part: which encoder (and how many of its layers) at which token limit."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(encoder.rstrip("/")) or encoder).strip("-").lower()
    return f"{name}-{max_length}" + (f"-{num_layers}layers" if num_layers else "")


def sidecar_path(shard: str | Path, tag: str) -> Path:
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.emb-{tag}.parquet")


def encode_array(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float16).tobytes()


def decode_array(data: bytes, length: int, dim: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float16).reshape(length, dim)


def sidecar_meta(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    out = json.loads(meta[b"prx.embeddings"])
    out["empty"] = decode_array(base64.b64decode(out["empty"]), out["empty_len"], out["dim"])
    return out


def write_sidecar(path: str | Path, ids: list[str], columns: dict[str, list[np.ndarray]], encoder: str,
                  max_length: int, empty: np.ndarray, row_group_sizes: list[int]) -> None:
    """Row-aligned with its shard and with the same row groups, written atomically."""
    path = Path(path)
    dim = int(empty.shape[-1])
    meta = {"encoder": encoder, "max_length": max_length, "dim": dim, "dtype": "float16",
            "empty": base64.b64encode(encode_array(empty)).decode(), "empty_len": int(empty.shape[0])}
    fields, arrays = [pa.field("id", pa.string())], [pa.array(ids, pa.string())]
    for name, values in columns.items():
        fields += [pa.field(name, pa.binary()), pa.field(f"{name}.len", pa.int16())]
        arrays += [pa.array([encode_array(v) for v in values], pa.binary()),
                   pa.array([int(v.shape[0]) for v in values], pa.int16())]
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"prx.embeddings": json.dumps(meta)}))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with pq.ParquetWriter(tmp, table.schema, compression="NONE") as writer:
        start = 0
        for size in row_group_sizes:  # the same row groups as the shard: one (group, row) address for both
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The index the loader plans with
# --------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    path: Path
    num_rows: int
    group_starts: np.ndarray  # first row of each row group
    width: np.ndarray
    height: np.ndarray
    caption_columns: list[str]
    group_bytes: int = 0  # mean uncompressed bytes of a row group (sizes the reader's cache)


def read_shard_info(path: str | Path) -> ShardInfo:
    path = Path(path)
    try:
        file = pq.ParquetFile(path)
    except Exception as e:
        raise PrxError(f"cannot read shard {path} ({type(e).__name__}: {str(e)[:100]}): re-convert it or remove "
                       f"it") from None
    caption_columns = caption_columns_of(path)
    try:
        table = file.read(columns=["width", "height"])
    except Exception as e:
        raise PrxError(f"cannot read shard {path} ({type(e).__name__}: {str(e)[:100]}): re-convert it or remove "
                       f"it") from None
    return shard_info(path, file, table.column("width").to_numpy(), table.column("height").to_numpy(), caption_columns)


def shard_info(path: Path, file: pq.ParquetFile, width: np.ndarray, height: np.ndarray,
               caption_columns: list[str]) -> ShardInfo:
    """The index entry of a Parquet file, its row groups read from the file's metadata."""
    groups = [file.metadata.row_group(i) for i in range(file.metadata.num_row_groups)]
    sizes = [g.num_rows for g in groups]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
    group_bytes = int(np.mean([g.total_byte_size for g in groups])) if groups else 0
    return ShardInfo(path, file.metadata.num_rows, starts, width, height, caption_columns, group_bytes)
