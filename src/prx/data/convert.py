"""``prx data convert``: image folders, webdataset tars and Hugging Face Parquet files → prx shards.

The inputs are cut into *tasks* deterministically (a tar or a Parquet file is one task; a
folder's images are grouped by size), and each task writes its own shards
(``part-TTTTT-KK.parquet``) and then a completion record (``.done/part-TTTTT.json``). A re-run
skips completed tasks, so an interrupted conversion resumes where it stopped; shards are written
atomically. Tasks run in parallel processes; under ``torchrun`` (or with ``--rank`` and
``--world-size``) each rank takes every world-size-th task. ``manifest.json`` sums up the
completed tasks: counts, bytes, aspect-ratio histogram, and rejected files with their reasons
(all of them in ``rejected.jsonl``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from tqdm import tqdm

from prx.data.imageio import BadImage, decode, probe
from prx.data.mapping import Mapping
from prx.data.shards import ROWS_PER_GROUP, write_shard
from prx.errors import PrxError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
STORED_FORMATS = {"JPEG", "PNG", "WEBP"}  # others are re-encoded losslessly to PNG
AR_BINS = [0.0, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, math.inf]  # width / height

@dataclass
class Task:
    index: int
    kind: str  # folder | webdataset | parquet
    inputs: list[str]
    root: str = ""


# --------------------------------------------------------------------------------------------
# Planning: inputs → tasks
# --------------------------------------------------------------------------------------------


def plan_tasks(kind: str, inputs: list[str], target_bytes: int) -> list[Task]:
    if kind == "folder":
        if len(inputs) != 1 or not Path(inputs[0]).is_dir():
            raise PrxError("--from folder takes one directory of images with .txt or .json captions beside them")
        root = Path(inputs[0])
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise PrxError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
        tasks, group, size = [], [], 0
        for f in files:
            group.append(str(f.relative_to(root)))
            size += f.stat().st_size
            if size >= target_bytes:
                tasks.append(Task(len(tasks), kind, group, str(root)))
                group, size = [], 0
        if group:
            tasks.append(Task(len(tasks), kind, group, str(root)))
        return tasks
    paths = []
    for item in inputs:
        p = Path(item)
        pattern = "*.tar" if kind == "webdataset" else "*.parquet"
        paths += sorted(p.rglob(pattern)) if p.is_dir() else [p]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise PrxError(f"input files not found: {', '.join(missing[:3]) or inputs}")
    return [Task(i, kind, [str(p)]) for i, p in enumerate(sorted(paths))]


def plan_fingerprint(tasks: list[Task], mapping: Mapping) -> str:
    text = json.dumps([[t.kind, t.root, t.inputs] for t in tasks] + [mapping.__dict__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Reading samples from each kind of input
# --------------------------------------------------------------------------------------------

RawSample = tuple[str, bytes | None, dict[str, object]]  # (id, image bytes, caption-ish fields)


def _read_text(data: bytes) -> tuple[str, bool]:
    """UTF-8, or (not fatal, counted) Latin-1 for legacy encodings."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def _caption_fields(text_files: dict[str, bytes]) -> dict[str, object]:
    fields: dict[str, object] = {}
    redecoded = False
    if "json" in text_files:
        text, redecoded = _read_text(text_files["json"])
        try:
            value = json.loads(text)
            if isinstance(value, dict):
                fields.update(value)
        except json.JSONDecodeError:
            fields["__bad_json__"] = True
    for ext in ("txt", "caption"):
        if ext in text_files:
            text, again = _read_text(text_files[ext])
            redecoded |= again
            fields.setdefault("caption", text)
            fields.setdefault("txt", text)
    if redecoded:
        fields["__latin1__"] = True
    return fields


def read_folder(task: Task) -> Iterator[RawSample]:
    root = Path(task.root)
    for rel in task.inputs:
        path = root / rel
        texts = {}
        for ext in ("txt", "json", "caption"):
            side = path.with_suffix("." + ext)
            if side.is_file():
                texts[ext] = side.read_bytes()
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        yield rel, data, _caption_fields(texts)


def read_webdataset(task: Task) -> Iterator[RawSample]:
    path = task.inputs[0]
    current_key, files = None, {}

    def flush():
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        return current_key, image, _caption_fields(files)

    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if key != current_key and current_key is not None:
                    yield flush()
                    files = {}
                current_key = key
                handle = tar.extractfile(member)
                files[ext] = handle.read() if handle else b""
            if current_key is not None:
                yield flush()
    except tarfile.TarError as e:
        raise PrxError(f"cannot read tar {path} ({e}): the file is damaged; re-download it or leave it out") from None


def check_columns(path, names: list[str], mapping: Mapping, how_to_fix: str) -> None:
    wanted = [mapping.image, *mapping.captions] + ([mapping.id] if mapping.id else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise PrxError(f"{path} has no column(s) {missing}; its columns are {names}: {how_to_fix}")


def image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
        return value.get("bytes")
    return value


def open_parquet(path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise PrxError(f"cannot read {path} ({type(e).__name__}): not a Parquet file?") from None


def read_parquet(task: Task, mapping: Mapping) -> Iterator[RawSample]:
    path = task.inputs[0]
    file = open_parquet(path)
    check_columns(path, file.schema_arrow.names, mapping,
                  "set the mapping with --image-column / --caption-columns (or --preset)")
    wanted = [mapping.image, *mapping.captions] + ([mapping.id] if mapping.id else [])
    row = 0
    for batch in file.iter_batches(batch_size=256, columns=list(dict.fromkeys(wanted))):
        for record in batch.to_pylist():
            sample_id = str(record[mapping.id]) if mapping.id else f"{Path(path).name}:{row}"
            yield sample_id, image_bytes(record[mapping.image]), {k: record[k] for k in mapping.captions}
            row += 1


# --------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------


def _ar_bin(width: int, height: int) -> str:
    ratio = width / height
    for lo, hi in zip(AR_BINS[:-1], AR_BINS[1:]):
        if lo <= ratio < hi:
            return f"{lo:g}-{hi:g}"
    return "inf"


def _normalise_image(data: bytes, verify: bool) -> tuple[bytes, int, int, str]:
    width, height, fmt = probe(data)
    if verify:
        decode(data)  # truncated or corrupt pixel data shows only on a full decode
    if fmt not in STORED_FORMATS:  # BMP, TIFF, GIF, MPO: store a lossless PNG of the upright RGB image
        buffer = io.BytesIO()
        image = decode(data)
        image.save(buffer, format="PNG")
        data, fmt, (width, height) = buffer.getvalue(), "PNG", image.size
    return data, width, height, fmt


def run_task(task: Task, out_dir: str, mapping: Mapping, target_bytes: int, verify: bool = True,
             rows_per_group: int = ROWS_PER_GROUP) -> dict:
    out = Path(out_dir)
    if task.kind == "folder":
        samples = read_folder(task)
    elif task.kind == "webdataset":
        samples = read_webdataset(task)
    else:
        samples = read_parquet(task, mapping)
    stats = {"task": task.index, "samples": 0, "bytes": 0, "shards": [], "rejected": [], "aspect_ratios": Counter(),
             "formats": Counter(), "latin1_captions": 0}
    rows, size, part = [], 0, 0
    sources = mapping.captions

    def flush():
        nonlocal rows, size, part
        if not rows:
            return
        name = f"part-{task.index:05d}-{part:02d}.parquet"
        written = write_shard(out / name, rows, mapping.caption_columns, rows_per_group)
        stats["shards"].append({"path": name, "samples": len(rows), "bytes": written})
        stats["bytes"] += written
        rows, size, part = [], 0, part + 1

    for sample_id, data, fields in samples:
        where = f"{task.inputs[0] if task.kind != 'folder' else task.root}:{sample_id}"
        if data is None:
            stats["rejected"].append({"source": where, "reason": "no image"})
            continue
        if fields.get("__bad_json__"):
            stats["rejected"].append({"source": where, "reason": "malformed json caption"})
            continue
        captions = {}
        for src, dst in sources.items():
            value = fields.get(src)
            if value is None and task.kind != "parquet" and src == "caption":
                value = fields.get("txt")
            if isinstance(value, list):  # several captions in one field: keep the first
                value = next((v for v in value if isinstance(v, str) and v.strip()), None)
            if isinstance(value, bytes):
                value, latin1 = _read_text(value)
                stats["latin1_captions"] += latin1
            captions[dst] = value.strip() if isinstance(value, str) else None
        if all(not c for c in captions.values()):
            reason = "missing caption" if all(c is None for c in captions.values()) else "empty caption"
            stats["rejected"].append({"source": where, "reason": reason})
            continue
        try:
            image_bytes, width, height, fmt = _normalise_image(data, verify)
        except BadImage as e:
            stats["rejected"].append({"source": where, "reason": e.reason})
            continue
        stats["latin1_captions"] += bool(fields.get("__latin1__"))
        rows.append({"id": sample_id, "image": image_bytes, "width": width, "height": height, "format": fmt,
                     "source": task.inputs[0] if task.kind != "folder" else task.root, **captions})
        stats["samples"] += 1
        stats["aspect_ratios"][_ar_bin(width, height)] += 1
        stats["formats"][fmt] += 1
        size += len(image_bytes)
        if size >= target_bytes:
            flush()
    flush()
    done = out / ".done" / f"part-{task.index:05d}.json"
    done.parent.mkdir(exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, done)
    return stats


def _run_task_star(args):
    return run_task(*args)


# --------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------


def write_manifest(out_dir: str | Path, caption_columns: list[str], fingerprint: str, total_tasks: int) -> dict:
    out = Path(out_dir)
    done = sorted((out / ".done").glob("part-*.json"))
    records = [json.loads(p.read_text()) for p in done]
    rejected = [r for rec in records for r in rec["rejected"]]
    ar, formats = Counter(), Counter()
    for rec in records:
        ar.update(rec["aspect_ratios"])
        formats.update(rec["formats"])
    manifest = {
        "prx_shards": 1, "plan": fingerprint, "tasks_done": len(records), "tasks_total": total_tasks,
        "complete": len(records) == total_tasks, "caption_columns": caption_columns,
        "samples": sum(r["samples"] for r in records), "bytes": sum(r["bytes"] for r in records),
        "shards": [s for rec in records for s in rec["shards"]],
        "aspect_ratio_histogram": dict(sorted(ar.items(), key=lambda kv: float(kv[0].split("-")[0]))),
        "formats": dict(formats), "latin1_captions": sum(r["latin1_captions"] for r in records),
        "rejected": {"count": len(rejected), "by_reason": dict(Counter(r["reason"] for r in rejected)),
                     "first": rejected[:100]},
    }
    (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, or (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def convert(kind: str, inputs: list[str], out_dir: str | Path, mapping: Mapping, workers: int = 1,
            target_bytes: int = 256 * 2**20, verify: bool = True, rank: int = 0, world_size: int = 1,
            progress: bool = True) -> dict:
    if kind not in ("folder", "webdataset", "parquet"):
        raise PrxError(f"unknown input kind '{kind}': use folder, webdataset or parquet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_tasks(kind, inputs, target_bytes)
    fingerprint = plan_fingerprint(tasks, mapping)
    plan_file = out / ".plan.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())["fingerprint"]
        if previous != fingerprint:
            raise PrxError(f"{out} holds a conversion of other inputs or another mapping: use a new --out "
                           f"directory (or delete {out} to start over)")
    elif rank == 0:
        plan_file.write_text(json.dumps({"fingerprint": fingerprint, "tasks": len(tasks)}))
    mine = [t for t in tasks if t.index % world_size == rank]
    pending = [t for t in mine if not (out / ".done" / f"part-{t.index:05d}.json").exists()]
    samples = 0
    args = [(t, str(out), mapping, target_bytes, verify) for t in pending]
    # closed however the loop ends, so an error is printed on a line of its own
    with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"convert (rank {rank})" if world_size > 1
              else "convert", unit="task", disable=not progress, dynamic_ncols=True) as bar:
        if workers > 1 and len(pending) > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"  # fork: no re-import
            with get_context(method).Pool(workers) as pool:
                for stats in pool.imap_unordered(_run_task_star, args):
                    samples += stats["samples"]
                    bar.update(1)
                    bar.set_postfix(samples=samples, refresh=False)
        else:
            for a in args:
                samples += run_task(*a)["samples"]
                bar.update(1)
                bar.set_postfix(samples=samples, refresh=False)
    return write_manifest(out, mapping.caption_columns, fingerprint, len(tasks))
