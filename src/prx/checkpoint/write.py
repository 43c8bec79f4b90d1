"""Writing checkpoints, atomically: a checkpoint is written to a hidden temporary directory and renamed into place
only when complete, then ``checkpoints/latest`` (a symlink) is switched to it. A crash at any moment leaves the
previous checkpoint intact and reachable; a write the disk refuses removes its partial files and names the
intact checkpoint the same command resumes from."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from prx.checkpoint.read import CONFIG, FORMAT, META, STATE, _step_dirs, header_digest, read_safetensors_header
from prx.checkpoint.state import split_state
from prx.config import Config
from prx.distributed import DistInfo, all_agree, barrier
from prx.errors import CheckpointNotWritten, os_errors_behind
from prx.rundir import LATEST, RunDir, step_dir_name, step_of


def _finalize(root: Path, tmp: Path, step: int, config: Config, keep: int, meta: dict,
              protect: int | None = None) -> Path:
    """Make a fully written checkpoint visible: metadata, rename into place, switch `latest`, prune (never the
    checkpoint of step ``protect``: a diverging run's newest confirmed one, prx.divergence)."""
    name = step_dir_name(step)
    final = root / name
    files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
    headers = {name: header_digest(read_safetensors_header(tmp / name, size)[0]) for name, size in files.items()}
    config.save(tmp / CONFIG)
    (tmp / META).write_text(json.dumps({"step": step, "time": time.time(), "format": FORMAT, "files": files,
                                        "headers": headers, **meta}))
    if final.exists():  # the same step written again (e.g. after a resume): replace it
        trash = root / f".old_{name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    link_tmp = root / f".{LATEST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(name, link_tmp)
    os.replace(link_tmp, root / LATEST)
    for old in _step_dirs(root)[:-keep]:
        if step_of(old) != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def make_room(root: Path, keep: int, log=print, free_bytes=_free_bytes, protect: int | None = None) -> None:
    """Before a save, where the disk has less room than the newest checkpoint takes: delete, oldest first, the
    checkpoints this save would prune once complete (``keep``: ``train.keep_checkpoints``), until it fits. The
    newest is never among them, so a failed write still leaves it, nor is the checkpoint of step ``protect``. A run
    then needs room for ``keep`` checkpoints at the peak instead of ``keep`` + 1."""
    steps = _step_dirs(root)
    if not steps:
        return
    need, free = _dir_bytes(steps[-1]), free_bytes(root)
    for old in steps[:len(steps) - max(keep - 1, 1)]:
        if free is None or free >= need:
            return
        if step_of(old) == protect:
            continue
        shutil.rmtree(old, ignore_errors=True)
        log(f"checkpoint: {_size(free)} free in {root}, less than {steps[-1].name} takes ({_size(need)}): "
            f"removed {old.name} first, which this save would have removed (train.keep_checkpoints={keep})")
        free = free_bytes(root)


def write_failure(error: BaseException | None) -> str:
    """What stopped a checkpoint write, in a few words: the operating system's error (``No space left on
    device``, ``Disk quota exceeded``) wherever it is in the chain or on whichever rank, else the error's
    first line."""
    os_error = next((e for e in os_errors_behind(error) if e.strerror), None)
    if os_error is not None:
        return os_error.strerror + (f" ({os_error.filename})" if os_error.filename else "")
    if error is None:
        return "another rank could not prepare it"
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class CheckpointWriter:
    """Writes checkpoints from every rank (DCP is collective); rank 0 makes them visible.

    Tensors go through torch's safetensors storage writer, one file per rank; the state's other
    values (step, counters, data position) are written by rank 0 as state.json. With
    ``asynchronous`` the tensors are staged in memory and written in the background while training
    goes on; the checkpoint becomes visible (renamed, `latest` switched) once every rank has
    finished writing, which :meth:`poll` checks each step. One save is in flight at a time.
    """

    def __init__(self, run: RunDir | str | Path, info=None, keep: int = 2, asynchronous: bool = False):
        self.root = (run if isinstance(run, RunDir) else RunDir(run)).checkpoints
        self.info = info or DistInfo()
        self.keep = keep
        self.asynchronous = asynchronous
        self.pending = None  # (future, tmp, step, config, meta)
        self.last: Path | None = None
        self.protect: int | None = None  # a checkpoint step pruning must keep (the trainer's newest confirmed one)
        self.group = None
        if not self.info.enabled:
            # one process: DCP warns on every save that there is no process group, also from the
            # background writer thread, where a catch_warnings() block of this thread cannot reach
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        if asynchronous and self.info.enabled:
            # the background writer's collectives must not interleave with training's: a group of its own
            self.group = dist.new_group(backend="gloo")

    def save(self, step: int, state: dict, config: Config, meta: dict | None = None, log=print) -> Path | None:
        """Write ``state`` as checkpoint ``step``; ``meta`` (JSON) goes into its meta.json; ``log`` says what
        :func:`make_room` removed first."""


        self.wait()
        tensors, values = split_state(state)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        failure = None
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                make_room(self.root, self.keep, log, protect=self.protect)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                (tmp / STATE).write_text(json.dumps(values, indent=1))
            except OSError as error:
                failure = error
        if not all_agree(failure is None, self.info):  # every rank stops, none waits for the others
            raise self._not_written(tmp, step, failure)
        single = not self.info.enabled  # one process: no collectives (and no warning that there are none)
        writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
        if self.asynchronous:
            response = dcp.async_save(tensors, storage_writer=writer, process_group=self.group, no_dist=single)
            self.pending = (getattr(response, "upload_completion", response), tmp, step, config, meta or {})
            return None
        try:
            dcp.save(tensors, storage_writer=writer, no_dist=single)
        except (Exception, CheckpointException) as error:  # DCP's is a BaseException, raised on every rank
            raise self._not_written(tmp, step, error) from error
        return self._finish(tmp, step, config, meta or {})

    def _finish(self, tmp: Path, step: int, config: Config, meta: dict) -> Path:

        barrier(self.info)  # every rank's shards are on disk
        final = self.root / step_dir_name(step)
        failure = None
        if self.info.is_main:
            try:
                _finalize(self.root, tmp, step, config, self.keep, meta, self.protect)
            except OSError as error:
                failure = error
        if not all_agree(failure is None, self.info):
            raise self._not_written(tmp, step, failure)
        self.last = final
        return final

    def _not_written(self, tmp: Path, step: int, error: BaseException | None) -> CheckpointNotWritten:
        """The error for a checkpoint that could not be written, once its partial files are gone (a full disk
        stays full otherwise): why, the room there is, and the checkpoint a resume starts from."""
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        steps = _step_dirs(self.root) if self.root.is_dir() else []
        free = _free_bytes(self.root if self.root.is_dir() else self.root.parent)
        room = f"{_size(free)} free in {self.root}" if free is not None else f"in {self.root}"
        if steps:
            room += f", where {steps[-1].name} takes {_size(_dir_bytes(steps[-1]))}"
        fix = "room, a quota" + (", or a lower train.keep_checkpoints" if len(steps) > 1 else "")
        newest = (f"{steps[-1].name} is intact, and once the cause is fixed ({fix}) the same command resumes from it"
                  if steps else f"No checkpoint of this run was written before: once the cause is fixed ({fix}) the "
                  f"same command starts it again")
        return CheckpointNotWritten(f"checkpoint {step_dir_name(step)} could not be written: {write_failure(error)} "
                                    f"({room}); its partial files are removed. {newest}")

    def poll(self) -> Path | None:
        """Finish a background save if every rank is done writing (call every step on every rank)."""

        if self.pending is None:
            return None
        future = self.pending[0]
        if not all_agree(future.done(), self.info):
            return None
        return self.wait()

    def wait(self) -> Path | None:
        if self.pending is None:
            return None
        future, tmp, step, config, meta = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as error:
            raise self._not_written(tmp, step, error) from error
        return self._finish(tmp, step, config, meta)
