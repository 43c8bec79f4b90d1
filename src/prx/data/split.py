"""``prx data split``: a stable held-out set, written as prx shards beside the training set.

A sample is held out when a hash of its ``id`` (and ``--seed``) falls below ``--fraction``, so the
same sample lands in the same split whatever the order of the inputs, the number of shards, or
which other samples are present; adding data never moves an old sample across. Rows are copied
as they are (image bytes, size, captions): nothing is decoded or re-encoded. Each output gets the
shards (``part-NNNNN.parquet``, written with :func:`prx.data.shards.write_shard`) and a
``manifest.json`` like ``prx data convert``'s, with a ``split`` entry that records the inputs,
fraction and seed; running the same split again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from prx.data.convert import _ar_bin
from prx.data.shards import BASE_COLUMNS, caption_columns_of, expand_shards, write_shard
from prx.errors import PrxError

TARGET_BYTES = 256 * 2**20  # output shard size, as prx data convert's default
MARKER = ".split.json"  # which split an output directory is being written for


def heldout_score(sample_id: str, seed: int = 0) -> float:
    """A number in [0, 1) that depends only on the sample's id and the seed (sha256: the same on
    every machine and Python version, unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(sample_id: str, fraction: float, seed: int = 0) -> bool:
    return heldout_score(sample_id, seed) < fraction


def _inside(path: Path, parent: Path) -> bool:
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def _prepare_outputs(inputs: list[str], outs: list[Path], fingerprint: str) -> bool:
    """True when both outputs already hold this very split. Else each output is made ready for it (the
    shards of an interrupted run of the same split are removed), or an error for outputs that would mix
    with other data or overlap the inputs."""
    if outs[0].resolve() == outs[1].resolve():
        raise PrxError(f"--out-train and --out-heldout are both '{outs[0]}': give two different directories")
    for out in outs:
        for item in inputs:
            source = Path(os.path.expanduser(item))
            if source.is_dir() and (_inside(out, source) or _inside(source, out)):
                raise PrxError(f"output '{out}' overlaps input '{item}': the input's shards would be read back "
                               f"as data; write the split beside it, e.g. --out-train {source.parent / 'train'}")

    def marker(out: Path) -> str | None:
        try:
            return json.loads((out / MARKER).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    if all(marker(out) == fingerprint and (out / "manifest.json").is_file() for out in outs):
        return True
    for out in outs:
        if marker(out) == fingerprint:  # the same split, interrupted: start it again
            for stale in [*out.glob("part-*.parquet"), out / "manifest.json"]:
                stale.unlink(missing_ok=True)
        elif (out / "manifest.json").is_file() or (out.is_dir() and any(out.glob("*.parquet"))):
            raise PrxError(f"'{out}' already holds other shards: give a new (or empty) directory, or delete it "
                           f"to split again")
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps({"fingerprint": fingerprint}))
    return False


class _Writer:
    """Rows of one output, flushed into shards of about ``target_bytes``."""

    def __init__(self, out: Path, caption_columns: list[str], target_bytes: int):
        self.out, self.columns, self.target = out, caption_columns, target_bytes
        self.rows: list[dict] = []
        self.size = 0
        self.shards: list[dict] = []
        self.samples = 0
        self.bytes = 0
        self.aspect_ratios: Counter = Counter()
        self.formats: Counter = Counter()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.size += len(row["image"] or b"")
        self.samples += 1
        self.aspect_ratios[_ar_bin(row["width"], row["height"])] += 1
        self.formats[row["format"]] += 1
        if self.size >= self.target:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.shards):05d}.parquet"
        written = write_shard(self.out / name, self.rows, self.columns)
        self.shards.append({"path": name, "samples": len(self.rows), "bytes": written})
        self.bytes += written
        self.rows, self.size = [], 0

    def manifest(self, split: dict) -> dict:
        return {"prx_shards": 1, "complete": True, "caption_columns": self.columns, "samples": self.samples,
                "bytes": self.bytes, "shards": self.shards,
                "aspect_ratio_histogram": dict(sorted(self.aspect_ratios.items(),
                                                      key=lambda kv: float(kv[0].split("-")[0]))),
                "formats": dict(self.formats), "rejected": {"count": 0, "by_reason": {}, "first": []},
                "split": split}


def split_shards(inputs: list[str], fraction: float, out_train: str | Path, out_heldout: str | Path, seed: int = 0,
                 target_bytes: int = TARGET_BYTES) -> dict:
    """Copy every row of the ``inputs`` (prx shards: files, directories or globs) into ``out_train`` or
    ``out_heldout`` by :func:`is_heldout`. Returns {"train": manifest, "heldout": manifest, ...}."""
    if not 0 < fraction < 1:
        raise PrxError(f"--fraction {fraction:g} must be between 0 and 1 (e.g. 0.05 holds out 5% of the samples)")
    shards = expand_shards(inputs)
    columns: list[str] = []
    for path in shards:
        columns += [c for c in caption_columns_of(path) if c not in columns]
    outs = [Path(os.path.expanduser(str(out_train))), Path(os.path.expanduser(str(out_heldout)))]
    fingerprint = hashlib.sha256(json.dumps(
        [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in shards] + [fraction, seed]
    ).encode()).hexdigest()[:16]
    if _prepare_outputs(inputs, outs, fingerprint):
        manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
        return {"train": manifests[0], "heldout": manifests[1], "damaged_row_groups": [], "already_done": True}
    writers = [_Writer(out, columns, target_bytes) for out in outs]
    damaged = []
    wanted = list(BASE_COLUMNS)
    for path in shards:
        file = pq.ParquetFile(path)
        own = [c for c in caption_columns_of(path)]
        for group in range(file.metadata.num_row_groups):
            try:
                rows = file.read_row_group(group, columns=wanted + own).to_pylist()
            except Exception as e:  # a damaged page or column chunk: its rows are skipped and counted
                damaged.append(f"{path} row group {group} ({type(e).__name__})")
                continue
            for row in rows:
                if row["id"] is None:
                    raise PrxError(f"{path} has a row without an id: re-convert it with `prx data convert`")
                writers[is_heldout(row["id"], fraction, seed)].add(row)
    split = {"fingerprint": fingerprint, "inputs": [str(p) for p in shards], "fraction": fraction, "seed": seed,
             "rule": "held out when sha256(f'{seed}:{id}')[:8] / 2**64 < fraction"}
    manifests = []
    for writer, role in zip(writers, ("train", "heldout")):
        writer.flush()
        writer.out.mkdir(parents=True, exist_ok=True)
        manifest = writer.manifest({**split, "role": role})
        tmp = writer.out / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, writer.out / "manifest.json")  # last: its presence means the split is complete
        manifests.append(manifest)
    return {"train": manifests[0], "heldout": manifests[1], "damaged_row_groups": damaged, "already_done": False}
