"""The training loader over prx shards (or Parquet files as downloaded, see :mod:`prx.data.inplace`).

Planning uses only the index (width and height of every sample), so it is cheap and the same in
every process:

1. each epoch shuffles the list of row groups of all shards (seed, stage, epoch);
2. rank r of W takes every W-th row group — disjoint, complete, for any world size;
3. the rank walks its row groups in windows of ``shuffle_window`` and shuffles samples inside
   each window (random order without random I/O over the whole dataset);
4. samples join the queue of their aspect-ratio bucket; a queue that reaches the batch size
   becomes the next batch, so a batch has one shape; ranks keep the same number of batches per
   epoch (the shortest plan), leftovers are dropped.

That is ``row_groups`` sharding: each rank reads 1/W of the bytes. With ``rows`` sharding (the default for
data of at most ``shuffle_window`` row groups, which every loader worker caches whole anyway) the plan is
made once for the global batch, as for one rank, and rank r takes rows r·B/W … (r+1)·B/W of every batch:
the same batches whatever the world size, also with fewer row groups than ranks.

Batch k of the plan is loaded by DataLoader worker k mod (number of workers), and the DataLoader
returns batches in plan order; the position (stage, epoch, next batch) is exact, is saved in the
checkpoint, and does not depend on the number of workers. Captions are chosen per sample by
column weights, from a seed of (seed, epoch, sample), so the choice does not depend on workers
either. A sample that fails to decode is replaced by another of its batch and counted.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import signal
import sys
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prx.data.buckets import Bucket, bucket_indices, make_buckets, resize_and_crop_box
from prx.data.imageio import BadImage, decode
from prx.data.index import DamagedRowGroup, RowGroupCache, ShardIndex
from prx.data.mapping import Mapping
from prx.data.shards import decode_array, sidecar_meta, sidecar_path
from prx.data.sources import DataBatch
from prx.errors import PrxError
from prx.text import TextBatch


def _release_freed_memory():
    """glibc's malloc_trim, or a no-op elsewhere.

    A worker's batch buffer is copied to shared memory to reach the main process and then freed;
    glibc keeps such freed blocks in the worker's heap, which then grew by the data volume every
    epoch (measured: +72 MiB per epoch per worker). Trimming after each batch keeps workers flat.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) % (2**63) for p in parts])


SHARDINGS = ("auto", "rows", "row_groups")


def split_rows(sharding: str, index: ShardIndex, shuffle_window: int) -> bool:
    """Does each rank take rows of every global batch (``rows``), rather than row groups of its own? ``auto``: rows
    for data of at most ``shuffle_window`` row groups (a worker caches a window whole, so every rank reading all of
    it costs little), decided without the world size so a run plans the same batches on any number of ranks."""
    if sharding not in SHARDINGS:
        raise PrxError(f"data.sharding='{sharding}' is unknown: use {', '.join(SHARDINGS)}")
    return sharding == "rows" or (sharding == "auto" and len(index.groups) <= shuffle_window)


class ShardPlanner:
    """The deterministic batch plan of one rank for one stage (``batch_size``: the rank's share of a batch).

    ``split_rows``: plan the global batches as one rank would and give rank r its rows of each (the same samples
    for any world size); else each rank plans batches from its own row groups."""

    def __init__(self, index: ShardIndex, resolution: int, patch: int, batch_size: int, rank: int, world: int,
                 seed: int, stage: int, shuffle_window: int = 16, aspect_range: tuple[float, float] = (0.5, 2.0),
                 split_rows: bool = False):
        self.index, self.batch_size, self.rank, self.world = index, batch_size, rank, world
        self.seed, self.stage, self.window, self.split_rows = seed, stage, shuffle_window, split_rows
        self.resolution, self.patch, self.aspect_range = resolution, patch, aspect_range
        self.buckets = make_buckets(resolution, patch, *aspect_range)
        self.bucket_of = bucket_indices(index.width, index.height, self.buckets)
        self._cache: dict[int, list[tuple[int, np.ndarray]]] = {}

    def _rank_plan(self, epoch: int, rank: int, world: int, batch_size: int) -> list[tuple[int, np.ndarray]]:
        groups = _seed(self.seed, self.stage, epoch, 1).permutation(len(self.index.groups))[rank::world]
        sequence = []
        for w in range(0, len(groups), self.window):
            window = np.concatenate([self.index.samples_of_group[g] for g in groups[w:w + self.window]])
            sequence.append(_seed(self.seed, self.stage, epoch, rank, w, 2).permutation(window))
        samples = np.concatenate(sequence) if sequence else np.zeros(0, np.int64)
        buckets = self.bucket_of[samples]
        batches, emitted = [], []
        for b in np.unique(buckets):
            members = samples[buckets == b]
            positions = np.nonzero(buckets == b)[0]
            full = len(members) // batch_size * batch_size
            for chunk, pos in zip(members[:full].reshape(-1, batch_size), positions[:full].reshape(-1, batch_size)):
                batches.append((int(b), chunk))
                emitted.append(pos[-1])  # a batch is ready when its last sample arrives
        return [batches[i] for i in np.argsort(emitted, kind="stable")]

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if epoch not in self._cache:
            if self.split_rows:  # one plan of global batches; this rank's rows of each
                rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
                plan = [(b, s[rows]) for b, s in self._rank_plan(epoch, 0, 1, self.batch_size * self.world)]
            else:
                plan = self._rank_plan(epoch, self.rank, self.world, self.batch_size)
                if self.world > 1:  # every rank takes the same number of steps
                    plan = plan[: min(len(self._rank_plan(epoch, r, self.world, self.batch_size))
                                      for r in range(self.world))]
            self._cache = {epoch: plan}
        return self._cache[epoch]

    def check(self, key: str = "train.batch_size") -> None:
        """A one-line error, with a batch size that works, when epoch 0 has no full batch (``key``: the config key of
        the global batch size)."""
        if self.plan(0):
            return
        total, n = self.batch_size * self.world, len(self.index)
        counts = np.bincount(self.bucket_of, minlength=len(self.buckets))
        held = ", ".join(f"{counts[i]} in {self.buckets[i].width}x{self.buckets[i].height}"
                         for i in np.argsort(-counts, kind="stable") if counts[i])
        where = (f"{n} samples in {len(self.index.groups)} row group(s) on {self.world} rank(s)" if self.world > 1
                 and not self.split_rows else f"{n} samples")
        message = (f"{where} give no full batch of {total} at {self.resolution} px: a batch comes from one "
                   f"aspect-ratio bucket ({held})")
        size = suggested_batch_size(counts, total, self.world)
        rows = "" if self.split_rows else " data.sharding=rows"  # (each rank reads only its own row groups)
        if size and rows and not ShardPlanner(self.index, self.resolution, self.patch, size // self.world, self.rank,
                                              self.world, self.seed, self.stage, self.window, split_rows=False,
                                              aspect_range=self.aspect_range).plan(0):
            message += f"; use {key}={size}{rows} (every rank takes rows of each batch) or add data"
        elif size:
            used = int(sum(c // size * size for c in counts))
            batches = f"{used // size} batch{'es' * (used // size > 1)}"
            message += f"; use {key}={size} ({used} of the {n} samples fill {batches} an epoch) or add data"
        else:
            message += f"; add data{f' (or use{rows})' if rows else ''}"
        raise PrxError(message)


def suggested_batch_size(counts: np.ndarray, batch_size: int, world: int) -> int:
    """The largest global batch size below ``batch_size``, ``world`` times a power of two, whose full batches take at
    least 3/4 of the samples bucketed as ``counts`` (0: none does)."""
    size, best = world, 0
    while size < batch_size:
        if 4 * sum(c // size * size for c in counts) >= 3 * counts.sum():
            best = size
        size *= 2
    return best


class _WorkerSignals:
    """The stop signals in DataLoader workers. Ctrl-C, SIGTERM and SIGUSR1 ask the *main* process to
    finish its step and save, but a terminal (Ctrl-C) or Slurm (SIGTERM) sends them to every process
    of the job: a worker that died of one would take the step, and the checkpoint, with it. Workers
    therefore ignore them, except SIGTERM once the loader is shutting down (``stopping`` set: the
    DataLoader's own fallback to end a worker) or once the main process is gone."""

    def __init__(self, stopping):
        self.stopping = stopping

    def __call__(self, worker_id: int) -> None:
        parent = os.getppid()

        def on_term(signum, frame):
            if self.stopping.is_set() or os.getppid() != parent:
                os._exit(0)

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, on_term)


class ShardBatches(IterableDataset):
    """Yields the plan's batches from ``start`` on; worker w of n takes batches w, w+n, …"""

    def __init__(self, planner: ShardPlanner, start: tuple[int, int], caption_weights: dict[str, float],
                 embedding_tag: str | None = None, max_epochs: int | None = None, min_text_length: int = 0):
        super().__init__()
        self.planner, self.start, self.embedding_tag, self.max_epochs = planner, start, embedding_tag, max_epochs
        self.min_text_length = min_text_length  # text.min_length: precomputed encodings padded as the encoder's are
        columns = planner.index.caption_columns
        weights = {c: w for c, w in caption_weights.items() if c in columns} if caption_weights else {}
        if caption_weights and not weights:
            raise PrxError(f"none of the caption columns {list(caption_weights)} is in every shard "
                           f"(the shards share {columns}): fix data.captions")
        if not weights:
            weights = {columns[0]: 1.0} if columns else {}
        if not weights:
            raise PrxError("the shards have no caption column in common")
        self.caption_names = list(weights)
        self.sidecar_dims: dict[Path, int] = {}
        self.reported: set[str] = set()  # damaged row groups this process has reported
        total = sum(weights.values())
        self.caption_probs = np.array([weights[c] / total for c in self.caption_names])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # A window's row groups should stay cached while its batches are read; prx shards' 32-row
        # groups fit the default, downloaded files' 100-row groups of large images need more.
        window_bytes = int(1.25 * self.planner.window * self.planner.index.group_bytes)
        cache = RowGroupCache(max(RowGroupCache.DEFAULT_BUDGET, window_bytes))
        trim = _release_freed_memory() if info else (lambda: None)
        epoch, k = self.start
        counter = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            plan = self.planner.plan(epoch)
            for index in range(k, len(plan)):
                if counter % workers == worker:
                    yield self.load(plan[index], epoch, index, cache)
                    trim()
                counter += 1
            epoch, k = epoch + 1, 0

    def choose_caption(self, epoch: int, sample: int) -> int:
        return int(_seed(self.planner.seed, epoch, sample, 3).choice(len(self.caption_names), p=self.caption_probs))

    def load(self, item: tuple[int, np.ndarray], epoch: int, batch_index: int, cache: RowGroupCache) -> DataBatch:
        bucket_index, samples = item
        bucket: Bucket = self.planner.buckets[bucket_index]
        idx = self.planner.index
        images, captions, ids, embeds, skipped, damaged = [], [], [], [], collections.Counter(), []
        columns = idx.read_columns(self.caption_names)
        for sample in samples:
            shard, row, group = int(idx.shard[sample]), int(idx.row[sample]), int(idx.group[sample])
            path = idx.paths[shard]
            local_group = idx.groups[group][1]
            r = row - idx.group_start[(shard, local_group)]
            try:
                table = cache.get(path, local_group, columns)
            except DamagedRowGroup as e:  # skipped and counted like a bad image; the file named once
                skipped[e.reason] += 1
                if str(e) not in self.reported:
                    self.reported.add(str(e))
                    damaged.append(str(e))
                continue
            choice = self.choose_caption(epoch, int(sample))
            names = [self.caption_names[choice]] + [n for n in self.caption_names if n != self.caption_names[choice]]
            caption, used = "", None
            for name in names:  # the chosen column, or another if it is empty for this sample
                value = idx.caption(table, r, name)
                if value is not None:
                    caption, used = value, name
                    break
            try:
                if used is None:
                    raise BadImage("no caption")
                cover, _ = resize_and_crop_box(int(idx.width[sample]), int(idx.height[sample]), bucket)
                image = decode(idx.image(table, r), at_least=cover)  # JPEG: decode at ≥ the needed size
                size, box = resize_and_crop_box(image.width, image.height, bucket)
                image = image.resize(size, resample=_RESAMPLE, reducing_gap=None).crop(box)
            except BadImage as e:
                skipped[e.reason] += 1
                continue
            images.append(np.asarray(image))
            captions.append(caption)
            ids.append(idx.sample_id(table, r, int(sample)))
            if self.embedding_tag is not None:
                try:
                    embeds.append(self._embedding(path, local_group, r, used, cache))
                except DamagedRowGroup as e:
                    skipped[e.reason] += 1
                    if str(e) not in self.reported:
                        self.reported.add(str(e))
                        damaged.append(str(e))
                    images.pop(), captions.pop(), ids.pop()
                    continue
        if not images:
            raise PrxError(f"every sample of batch {batch_index} (epoch {epoch}) failed to load "
                           f"({dict(skipped)}): check the shards with `prx data inspect`")
        while len(images) < len(samples):  # keep the batch size: repeat good samples in place of bad ones
            j = len(images) % max(1, len(ids))
            images.append(images[j])
            captions.append(captions[j])
            ids.append(ids[j])
            if embeds:
                embeds.append(embeds[j])
        tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        text = None
        if embeds:
            length = max(e.shape[0] for e in embeds)
            length = max(-(-length // 8) * 8, self.min_text_length)
            e = torch.zeros(len(embeds), length, embeds[0].shape[1], dtype=torch.float16)
            mask = torch.zeros(len(embeds), length, dtype=torch.bool)
            for i, arr in enumerate(embeds):
                e[i, : arr.shape[0]] = torch.from_numpy(arr.copy())
                mask[i, : arr.shape[0]] = True
            text = TextBatch(e, mask)
        return DataBatch(tensor, captions, ids, text, (epoch, batch_index), dict(skipped), damaged)

    def _embedding(self, shard: Path, group: int, row: int, column: str, cache: RowGroupCache) -> np.ndarray:
        side = sidecar_path(shard, self.embedding_tag)
        table = cache.get(side, group, [column, f"{column}.len"])
        if side not in self.sidecar_dims:
            self.sidecar_dims[side] = sidecar_meta(side)["dim"]
        dim = self.sidecar_dims[side]
        return decode_array(table.column(column)[row].as_py(), int(table.column(f"{column}.len")[row].as_py()), dim)


try:
    from PIL import Image

    _RESAMPLE = Image.Resampling.BICUBIC
except AttributeError:  # pragma: no cover
    _RESAMPLE = 3


class ShardLoader:
    """The trainer's view: ``next()`` returns the next batch; ``state_dict()`` is the exact position."""

    def __init__(self, shards: list[Path], patch: int, seed: int, caption_weights: dict[str, float],
                 num_workers: int = 2, rank: int = 0, world: int = 1, shuffle_window: int = 16,
                 aspect_range: tuple[float, float] = (0.5, 2.0), embedding_tag: str | None = None,
                 mapping: Mapping | None = None, min_text_length: int = 0, sharding: str = "auto"):
        self.index = ShardIndex(shards, mapping, progress=rank == 0)
        self.sharding = sharding
        self._planners: dict[tuple[int, int, int], ShardPlanner] = {}
        self.patch, self.seed, self.caption_weights = patch, seed, caption_weights
        self.num_workers, self.rank, self.world = num_workers, rank, world
        self.shuffle_window, self.aspect_range = shuffle_window, aspect_range
        self.embedding_tag, self.min_text_length = embedding_tag, min_text_length
        self.empty_embedding = None
        if embedding_tag is not None:
            missing = [p for p in self.index.paths if not sidecar_path(p, embedding_tag).exists()]
            if missing:
                raise PrxError(f"{len(missing)} shard(s) have no embeddings for '{embedding_tag}' (e.g. "
                               f"{sidecar_path(missing[0], embedding_tag)}): run `prx data embed` or set "
                               f"data.embeddings=off")
            self.empty_embedding = sidecar_meta(sidecar_path(self.index.paths[0], embedding_tag))["empty"]
        self.stage: int | None = None
        self.position = (0, 0)  # (epoch, next batch)
        self.skipped: collections.Counter = collections.Counter()
        self.warned: set[str] = set()
        self._iterator = None
        self._stopping = None
        self._atexit = False

    def set_stage(self, stage: int, resolution: int, batch_size: int) -> None:
        """Switch to a stage (a new stage starts at its own epoch 0)."""
        if stage == self.stage and self._iterator is not None:
            return
        if stage != self.stage:
            if self.stage is not None:
                self.position = (0, 0)
            self.stage = stage
        self.planner = self.planner_for(stage, resolution, batch_size)
        self.planner.check()  # would otherwise wait forever for a first batch
        self._start()

    def planner_for(self, stage: int, resolution: int, batch_size: int) -> ShardPlanner:
        """The plan of a stage (``batch_size``: this rank's share); ``.check(key)`` says whether it has batches."""
        key = (stage, resolution, batch_size)
        if key not in self._planners:
            self._planners[key] = ShardPlanner(self.index, resolution, self.patch, batch_size, self.rank, self.world,
                                               self.seed, stage, self.shuffle_window, self.aspect_range,
                                               split_rows(self.sharding, self.index, self.shuffle_window))
        return self._planners[key]

    def _start(self) -> None:
        import atexit
        self.close()
        dataset = ShardBatches(self.planner, self.position, self.caption_weights, self.embedding_tag,
                               min_text_length=self.min_text_length)
        self._stopping = multiprocessing.Event()
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
                            worker_init_fn=_WorkerSignals(self._stopping) if self.num_workers else None)
        self._iterator = iter(loader)
        # At exit multiprocessing terminates its daemonic children (SIGTERM), which these workers ignore until
        # told the loader is stopping: told here whatever became of this loader, or an exit can wait for ever
        atexit.register(self._stopping.set)
        if not self._atexit:  # before multiprocessing's own exit handler terminates the workers

            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().close())
            self._atexit = True

    def close(self) -> None:
        """Stop the worker processes (also at interpreter exit)."""
        if self._stopping is not None:
            self._stopping.set()
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def next(self) -> DataBatch:
        batch = next(self._iterator)
        epoch, index = batch.position
        self.position = (epoch, index + 1)
        self.skipped.update(batch.skipped)
        for message in batch.damaged:
            if message not in self.warned:
                self.warned.add(message)
                print(f"warning: {message}: its samples are skipped and counted (check the data with "
                      f"`prx data inspect --check all`)", file=sys.stderr, flush=True)
        return batch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.planner.plan(self.position[0]))

    def state_dict(self) -> dict:
        return {"stage": -1 if self.stage is None else self.stage, "epoch": self.position[0],
                "batch": self.position[1], "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.stage = None if state["stage"] < 0 else int(state["stage"])
        self.position = (int(state["epoch"]), int(state["batch"]))
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.close()
