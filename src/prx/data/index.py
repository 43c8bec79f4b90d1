"""The index of a set of shards (or Parquet files read in place): every sample's shard, row group, row, width and
height, read from the files' size columns (or cached headers) without decoding an image. Planning a run, counting
its buckets and ``prx data inspect`` use it; :func:`check_samples` decodes samples to find bad ones."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prx.data.convert import image_bytes
from prx.data.imageio import BadImage, decode
from prx.data.inplace import read_inplace_infos
from prx.data.mapping import Mapping
from prx.data.shards import caption_columns_of, read_shard_info


class ShardIndex:
    """Where every sample is (shard, row group, row) and which bucket it falls in.

    With a ``mapping`` the files are Parquet files as downloaded, read in place through that
    column mapping (:mod:`prx.data.inplace`); rows whose image cannot be probed are left out."""

    def __init__(self, shards: list[Path], mapping: Mapping | None = None, progress: bool = True):
        self.mapping = mapping
        if mapping is None:
            infos = [read_shard_info(p) for p in shards]
        else:
            infos = read_inplace_infos(list(shards), mapping, progress)
        self.paths = [i.path for i in infos]
        columns = [set(i.caption_columns) for i in infos]
        self.caption_columns = sorted(set.intersection(*columns)) if columns else []
        self.group_bytes = int(np.mean([i.group_bytes for i in infos])) if infos else 0
        shard_of, row_of, group_of, widths, heights, group_rows = [], [], [], [], [], []
        self.groups: list[tuple[int, int]] = []  # (shard, group) in index order
        group_offset = 0
        for s, info in enumerate(infos):
            rows = np.arange(info.num_rows)
            group = np.searchsorted(info.group_starts, rows, side="right") - 1
            shard_of.append(np.full(info.num_rows, s, np.int32))
            row_of.append(rows)
            group_of.append(group + group_offset)
            widths.append(info.width)
            heights.append(info.height)
            self.groups += [(s, g) for g in range(len(info.group_starts))]
            group_rows.append(info.group_starts)
            group_offset += len(info.group_starts)
        self.shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.row = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)
        self.group = np.concatenate(group_of) if group_of else np.zeros(0, np.int64)
        self.width = np.concatenate(widths) if widths else np.zeros(0, np.int32)
        self.height = np.concatenate(heights) if heights else np.zeros(0, np.int32)
        usable = (self.width > 0) & (self.height > 0)  # always true for prx shards (checked when converted)
        self.unusable = int((~usable).sum())
        if self.unusable:
            self.shard, self.row, self.group = self.shard[usable], self.row[usable], self.group[usable]
            self.width, self.height = self.width[usable], self.height[usable]
        self.group_start = {(s, g): int(start) for s, starts in enumerate(group_rows) for g, start in enumerate(starts)}
        order = np.argsort(self.group, kind="stable")
        self.samples_of_group = np.split(order, np.cumsum(np.bincount(self.group, minlength=len(self.groups)))[:-1])

    def __len__(self) -> int:
        return len(self.shard)

    # How a row's fields are read: prx shards by their own column names, downloaded files
    # through the mapping.

    def read_columns(self, caption_columns: list[str]) -> list[str]:
        if self.mapping is None:
            return ["id", "image", *caption_columns]
        m = self.mapping
        sources = [src for column in caption_columns for src in m.sources_of(column)]
        return list(dict.fromkeys(([m.id] if m.id else []) + [m.image] + sources))

    def caption(self, table, row: int, column: str) -> str | None:
        for source in [column] if self.mapping is None else self.mapping.sources_of(column):
            value = table.column(source)[row].as_py()
            if isinstance(value, str) and value.strip():
                return value
        return None

    def image(self, table, row: int) -> bytes | None:
        return image_bytes(table.column("image" if self.mapping is None else self.mapping.image)[row].as_py())

    def sample_id(self, table, row: int, sample: int) -> str:
        if self.mapping is None or self.mapping.id:
            return str(table.column("id" if self.mapping is None else self.mapping.id)[row].as_py())
        return f"{self.paths[int(self.shard[sample])].name}:{int(self.row[sample])}"


def sample_captions(index: ShardIndex, count: int, seed: int = 0, column: str | None = None) -> list[str]:
    """Up to ``count`` distinct captions of ``column`` (default: the first caption column, in the converter's order)
    of samples chosen by ``seed``; only their row groups' caption column is read (a damaged one is passed over)."""
    if column is None and index.caption_columns:
        order = caption_columns_of(index.paths[0]) if index.mapping is None else index.caption_columns
        column = next((c for c in order if c in index.caption_columns), None)
    if column is None or not len(index):
        return []
    sources = [column] if index.mapping is None else index.mapping.sources_of(column)
    found: list[str] = []
    tables: dict[tuple[int, int], pa.Table | None] = {}
    for sample in np.random.default_rng([int(seed), 0x9A11]).permutation(len(index))[: 64 * count]:
        key = index.groups[int(index.group[sample])]
        if key not in tables:
            try:
                tables[key] = pq.ParquetFile(index.paths[key[0]]).read_row_group(key[1], columns=sources)
            except (OSError, ValueError, pa.ArrowException):
                tables[key] = None
        if tables[key] is not None:
            caption = index.caption(tables[key], int(index.row[sample]) - index.group_start[key], column)
            if caption and caption.strip() not in found:
                found.append(caption.strip())
        if len(found) == count:
            break
    return found


def check_samples(index: ShardIndex, samples: np.ndarray | None = None, progress: bool = True) -> dict:
    """Read the row groups of ``samples`` (every sample when None) and decode their images, as
    training would: {"checked": n, "failed": {reason: count}, "damaged": [row groups that cannot be
    read], "bad": [file:row of images that cannot be decoded (the first 20)]}."""
    from tqdm import tqdm

    samples = np.arange(len(index)) if samples is None else np.asarray(samples)
    failed, damaged, bad = collections.Counter(), [], []
    cache = RowGroupCache()
    order = samples[np.argsort(index.group[samples], kind="stable")]
    columns = index.read_columns([])
    with tqdm(total=len(order), desc="checking", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for group in np.unique(index.group[order]):
            members = order[index.group[order] == group]
            shard, local = index.groups[int(group)]
            path = index.paths[shard]
            try:
                table = cache.get(path, local, columns)
            except DamagedRowGroup as e:
                failed[e.reason] += len(members)
                damaged.append(f"{e} ({len(members)} samples)")
                bar.update(len(members))
                continue
            for sample in members:
                row = int(index.row[sample]) - index.group_start[(shard, local)]
                try:
                    decode(index.image(table, row))
                except BadImage as e:
                    failed[e.reason] += 1
                    if len(bad) < 20:
                        bad.append(f"{path}:{int(index.row[sample])} ({e.reason})")
            bar.update(len(members))
            cache.items.clear()
            cache.used = 0
    return {"checked": len(order), "failed": dict(failed), "damaged": damaged, "bad": bad}


class DamagedRowGroup(Exception):
    """A row group pyarrow cannot read (a damaged page or column chunk inside an otherwise valid file)."""

    reason = "damaged row group"

    def __init__(self, path: Path, group: int, error: Exception):
        self.path, self.group = path, group
        self.detail = " ".join(str(error).split())[:160] or type(error).__name__
        super().__init__(f"{path}: row group {group} cannot be read ({self.detail})")


class RowGroupCache:
    """Recently read row groups of a worker, bounded by bytes."""

    DEFAULT_BUDGET = 256 * 2**20

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET):
        self.budget, self.used = budget_bytes, 0
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.files: dict[Path, pq.ParquetFile] = {}
        self.damaged: dict[tuple[Path, int], DamagedRowGroup] = {}

    def get(self, path: Path, group: int, columns: list[str]):
        """The row group's table; :class:`DamagedRowGroup` when pyarrow cannot read it (remembered)."""
        key = (path, group, tuple(columns))
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        if (path, group) in self.damaged:
            raise self.damaged[(path, group)]
        try:
            if path not in self.files:
                if len(self.files) > 64:
                    self.files.clear()
                self.files[path] = pq.ParquetFile(path)
            table = self.files[path].read_row_group(group, columns=columns)
        except (OSError, ValueError, pa.ArrowException) as e:  # a damaged page, chunk or footer
            self.damaged[(path, group)] = DamagedRowGroup(path, group, e)
            raise self.damaged[(path, group)] from None
        self.items[key] = table
        self.used += table.nbytes
        while self.used > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.used -= old.nbytes
        return table
