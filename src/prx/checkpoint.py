"""Checkpoints: the one module that knows what a checkpoint holds, under which names, and where.

Written with ``torch.distributed.checkpoint`` (one process, or sharded under FSDP2) through torch's
own safetensors storage (``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``: every rank
writes its shards as one ``.safetensors`` file) and made atomic: a checkpoint is written to a
hidden temporary directory and renamed into place only when complete, then
``checkpoints/latest`` (a symlink) is switched to it. A crash at any moment leaves the previous
checkpoint intact and reachable.

**Loading runs no code from the checkpoint.** Tensors are read from safetensors files (a JSON
header and raw bytes); everything else a run needs (step, data position, counters) is JSON in
``state.json``. Optimizer hyperparameters are not saved at all: they come from the config, so a
changed ``optimizer.lr`` takes effect on resume. Checkpoints of older prx versions (DCP's default
layout: a pickled ``.metadata`` and ``.distcp`` files holding pickled Python values) are still
read, through an allow-list unpickler that builds only DCP's own metadata classes and
``torch.load(weights_only=True)`` for the values; anything else is refused as tampered.

Layout::

    RUN/config.yaml                   resolved config of the run
    RUN/.lock                         held (flock) by the training that uses the run directory
    RUN/checkpoints/step_00001000/    shard-0000R-model-00001-of-00001.safetensors (one per rank),
                                      state.json, config.yaml, meta.json (step, format, file sizes)
    RUN/checkpoints/latest -> step_00001000

State, by key (:func:`training_state`)::

    model.denoiser.*, model.repa_projector.*   the trained modules (the projector only with REPA)
    optimizer.state.*                          Muon and Adam state tensors (torch's get_state_dict layout)
    ema.model.*                                the EMA copy of the denoiser: what sampling uses
    rng.torch                                  the CPU generator's state, as a uint8 tensor
    state.json: trainer.step, trainer.bad_steps, ema.num_updates, data.* (the data source's exact position)

A damaged checkpoint (a truncated or altered file, unreadable ``meta.json`` / ``state.json`` /
``config.yaml``) is reported as damaged, naming the file; training then resumes from the newest
intact checkpoint and moves the damaged ones aside (``checkpoints/.damaged_step_N``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from prx.config import Config, config_from_dict, read_yaml
from prx.errors import (CheckpointDamaged, CheckpointError, CheckpointNotWritten, ConfigError, PrxError,
                        os_errors_behind)

LATEST = "latest"
FORMAT = 2  # safetensors shards + state.json; format 1 (no "format" in meta.json): DCP's default pickled layout
META, STATE, CONFIG = "meta.json", "state.json", "config.yaml"
DAMAGED_PREFIX = ".damaged_"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory holds (from its name)."""
    return int(Path(path).name.split("_")[1])


# --------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------


def training_state(trainer) -> dict:
    """Everything a run needs to continue exactly, in the layout above (tensors stay sharded; the
    values that are not tensors go to state.json). The optimizers' hyperparameters are not part of
    it: they come from the run's config (a changed ``optimizer.lr`` takes effect on resume)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers)
    return {
        "model": model_state,
        "optimizer": {"state": optim_state["state"]},
        "ema": trainer.ema.state_dict(),
        "trainer": {"step": trainer.step, "bad_steps": trainer.bad_steps},
        "data": trainer.data.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


def restore_training_state(trainer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers)
    tensors = {"model": model_state, "optimizer": {"state": optim_state["state"]},
               "ema": {"model": trainer.ema.model.state_dict()}, "rng": {"torch": torch.get_rng_state()}}
    values = load_checkpoint(path, tensors)
    # the param groups (lr, base_lr, betas, ...) stay this run's: only the optimizers' state tensors are loaded
    set_state_dict(trainer.trainable, trainer.optimizer.optimizers, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"]["state"], "param_groups": optim_state["param_groups"]})
    try:
        trainer.ema.load_state_dict({"model": tensors["ema"]["model"], "num_updates": int(values["ema"]["num_updates"])})
        trainer.step = int(values["trainer"]["step"])
        trainer.bad_steps = int(values["trainer"]["bad_steps"])
        data = values.get("data", {})
        if not isinstance(data, dict):
            raise TypeError("data")
        trainer.data.load_state_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint '{path}' is damaged: {STATE} has no valid {e}") from None
    torch.set_rng_state(tensors["rng"]["torch"])
    trainer.planned_steps = checkpoint_meta(path).get("planned_steps")  # a time budget's choice, kept
    if trainer.planned_steps and trainer.config.train.time_budget_minutes:
        trainer.config.train.steps = trainer.planned_steps


def load_weights(path: str | Path, model: torch.nn.Module, weights: str = "ema") -> Path:
    """Fill a (full, unsharded) denoiser with a checkpoint's EMA or raw weights, whatever world size
    wrote it; returns the checkpoint directory. For sampling, export and evaluation: tensors only."""
    if weights not in ("ema", "model"):
        raise ValueError("weights must be 'ema' or 'model'")
    tensors = model.state_dict()
    state = {"ema": {"model": tensors}} if weights == "ema" else {"model": {f"denoiser.{k}": v for k, v in tensors.items()}}
    path = find_checkpoint(path)
    load_checkpoint(path, state)
    return path


def split_state(state: dict, where: str = "", _seen: set | None = None) -> tuple[dict, dict]:
    """(tensors, values): the tensor leaves of a nested state dict (for safetensors, which stores a
    memory shared by two entries once per entry: such a tensor is copied) and the rest (plain JSON
    values: numbers, strings, lists, dicts)."""
    tensors, values = {}, {}
    seen = set() if _seen is None else _seen
    for key, value in state.items():
        name = f"{where}{key}"
        if isinstance(value, torch.Tensor):
            if not hasattr(value, "to_local"):  # a DTensor's local shard is its own
                ptr = value.untyped_storage().data_ptr()
                if ptr in seen:
                    value = value.clone()
                    ptr = value.untyped_storage().data_ptr()
                seen.add(ptr)
            tensors[key] = value
        elif isinstance(value, dict):
            t, v = split_state(value, name + ".", seen)
            if t:
                tensors[key] = t
            if v or not t:
                values[key] = v
        else:
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError):
                raise TypeError(f"checkpoint state '{name}' is a {type(value).__name__}: only tensors and JSON "
                                f"values (numbers, strings, lists, dicts) can be saved") from None
            values[key] = value
    return tensors, values


# --------------------------------------------------------------------------------------------
# Where checkpoints are
# --------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    """Made visible by the writer (everything is written before meta.json and config.yaml)."""
    return (path / META).is_file() and (path / CONFIG).is_file()


def _step_dirs(root: Path) -> list[Path]:
    dirs = []
    for p in root.glob("step_*"):
        try:
            step_of(p)
        except (IndexError, ValueError):
            continue
        if p.is_dir() and _is_complete(p):
            dirs.append(p)
    return sorted(dirs, key=step_of)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` directory or a run directory
    (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass a run directory or a checkpoint directory")
    if _is_complete(path):
        return path.resolve()
    for root in (path / "checkpoints", path):
        steps = _step_dirs(root) if root.is_dir() else []
        if steps:
            return steps[-1].resolve()
    raise CheckpointError(
        f"no complete checkpoint under '{path}': pass a run directory with checkpoints/ or a checkpoint "
        f"directory (it holds meta.json and config.yaml)"
    )


def has_checkpoint(run_dir: str | Path) -> bool:
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and bool(_step_dirs(root))


def newest_intact(root: Path, log=print, move_aside: bool = True) -> Path:
    """The newest checkpoint under ``root`` that :func:`verify_checkpoint` accepts. Damaged newer ones
    are reported (and, with ``move_aside``, renamed to ``.damaged_step_N`` so nothing reads them again)."""
    damaged: list[tuple[Path, CheckpointDamaged]] = []
    for path in reversed(_step_dirs(root)):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            damaged.append((path, e))
            continue
        for bad, error in damaged:
            aside = root / f"{DAMAGED_PREFIX}{bad.name}"
            if move_aside:
                shutil.rmtree(aside, ignore_errors=True)
                try:
                    os.rename(bad, aside)
                except OSError:
                    pass  # another rank moved it
            log(f"warning: {error}; resuming from {path.name}, the newest intact checkpoint"
                + (f" (the damaged one is kept as {aside})" if move_aside else ""))
        return path.resolve()
    raise CheckpointDamaged(f"no intact checkpoint under '{root}' ({damaged[0][1]}): start a new run with --out, or "
                            f"restore the files") if damaged else CheckpointError(f"no checkpoint under '{root}'")


def migrate_saved_config(data: dict) -> dict:
    """A config saved by an older prx, as that prx meant it: defaults that changed since keep their old value.

    - model.norm_eps: LayerNorm eps was a fixed 1e-5 before the option (new runs: 1e-6, as diffusers);
    - sampling.schedule: sampling used shift(linspace(1, 0, N+1)) before the option (new runs: diffusers').
    """
    data = dict(data)
    if isinstance(data.get("model"), dict) and "norm_eps" not in data["model"]:
        data["model"] = {**data["model"], "norm_eps": 1e-5}
    if isinstance(data.get("sampling"), dict) and "schedule" not in data["sampling"]:
        data["sampling"] = {**data["sampling"], "schedule": "linspace"}
    return data


def checkpoint_to_resume(run_dir: Path, resume: bool | None, config: Config, log=print,
                         is_main: bool = True) -> Path | None:
    """The run directory's newest intact checkpoint to continue from (None: a new run), after the checks
    (the config keys that differ from the run's saved config are printed; they take effect):
    ``resume`` True requires a checkpoint, False forbids one, None takes one if there is one; a
    checkpoint of another model shape, or a change of a key that cannot change mid-run, is refused;
    damaged checkpoints are skipped, saying so."""
    from prx.resume import describe_changes, resume_changes
    from prx.runtime import make_writable_dir

    exists = has_checkpoint(run_dir)
    if resume is True and not exists:
        raise CheckpointError(f"--resume given but '{run_dir}' has no checkpoint: drop --resume to start a new run there")
    if resume is False and exists:
        raise CheckpointError(f"'{run_dir}' already holds a run: resume it (drop the flag that forbids it) or choose --out")
    make_writable_dir(run_dir, "run directory")
    if not exists:
        return None
    path = newest_intact(run_dir / "checkpoints", log if is_main else (lambda *a, **k: None), move_aside=is_main)
    saved, model = checkpoint_config(path), config.model
    model.norm_eps = saved.model.norm_eps  # the weights' own (1e-5 in runs from before the option)
    shape = dict(text_dim=None, init_from=None, patch_bias_std=0.0)  # how a run started, not what it is
    if replace(saved.model, **shape) != replace(model, **shape) or (
            model.text_dim is not None and saved.model.text_dim != model.text_dim):
        raise CheckpointError(f"'{run_dir}' holds a run with a different model config: use --out for a new run, or the "
                              f"run's own config ({run_dir / 'config.yaml'})")
    meta = checkpoint_meta(path)
    if meta.get("planned_steps") and config.train.time_budget_minutes:
        config.train.steps = meta["planned_steps"]  # the step count the run's time budget chose, not a change
    changes = resume_changes(saved, config, meta["step"])
    if changes and is_main:  # they take effect; the trainer's config.yaml records them
        log(f"resuming with a changed config (recorded in {run_dir / 'config.yaml'}): {describe_changes(changes)}")
    return path


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was written with (older prx versions' configs migrated, see migrate_saved_config)."""
    path = find_checkpoint(path)
    try:
        data = read_yaml(path / CONFIG)
    except ConfigError as e:
        raise CheckpointDamaged(f"checkpoint '{path}' is damaged: {CONFIG} cannot be read ({e})") from None
    try:
        return config_from_dict(migrate_saved_config(data))
    except PrxError as e:
        raise CheckpointError(f"checkpoint '{path}' has a config this prx cannot read ({e})") from None


def checkpoint_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint (its step, format, files), once the checkpoint is known to be intact."""
    return verify_checkpoint(find_checkpoint(path))


# --------------------------------------------------------------------------------------------
# Integrity: a damaged or tampered checkpoint is named as such, before anything reads it
# --------------------------------------------------------------------------------------------


def _damaged(path: Path, what: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"checkpoint '{path}' is damaged: {what}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(path.parent, f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(path.parent, f"{path.name} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict):
        raise _damaged(path.parent, f"{path.name} does not hold a JSON object")
    return data


def _check_safetensors(path: Path, size: int) -> None:
    """The file's JSON header parses and its tensors end exactly at the end of the file."""
    ckpt = path.parent
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(ckpt, f"{path.name} is truncated ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 256 * 2**20):
            raise _damaged(ckpt, f"{path.name} has a corrupt header (claims {n} header bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise _damaged(ckpt, f"{path.name} has a corrupt header (not a safetensors JSON header)") from None
    if 8 + n + max(ends, default=0) != size:
        raise _damaged(ckpt, f"{path.name} is truncated or has extra bytes ({size} bytes, its header describes "
                             f"{8 + n + max(ends, default=0)})")


def verify_checkpoint(path: Path) -> dict:
    """Check a checkpoint's files before reading any tensor: meta.json, config.yaml and state.json
    parse, every tensor file is there with the size it was written with and a well-formed header.
    Returns meta.json; raises :class:`CheckpointDamaged` naming the file otherwise."""
    path = Path(path)
    try:
        return _verify(path)
    except OSError as e:  # unreadable, or moved away while being read
        raise _damaged(path, f"{Path(e.filename or '?').name} cannot be read ({e.strerror or e})") from None


def _verify(path: Path) -> dict:
    meta = _read_json(path / META)
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise _damaged(path, f"{META} has no valid step")
    try:
        read_yaml(path / CONFIG)
    except ConfigError as e:
        raise _damaged(path, f"{CONFIG} cannot be read ({e})") from None
    fmt = meta.get("format", 1)
    if fmt == FORMAT:
        _read_json(path / STATE)
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise _damaged(path, f"{META} lists no tensor files")
        for name, size in files.items():
            file = path / str(name)
            if "/" in str(name) or not file.is_file():
                raise _damaged(path, f"{name} is missing")
            actual = file.stat().st_size
            if actual != size:
                raise _damaged(path, f"{name} is truncated or altered ({actual} bytes, written with {size})")
            _check_safetensors(file, actual)
        extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in files)
        if extra:
            raise _damaged(path, f"{extra[0]} was not written with it (an extra tensor file)")
    elif fmt == 1:
        metadata = read_legacy_metadata(path)
        for info in metadata.storage_data.values():
            name = str(info.relative_path)
            file = path / name
            if "/" in name or name.startswith(".") or not file.is_file():
                raise _damaged(path, f"{name} is missing")
            if info.offset + info.length > file.stat().st_size:
                raise _damaged(path, f"{name} is truncated ({file.stat().st_size} bytes, needs "
                                     f"{info.offset + info.length})")
    else:
        raise CheckpointError(f"checkpoint '{path}' has format {fmt!r}, unknown to this prx: use the prx that wrote it")
    return meta


# Checkpoints of prx before format 2: DCP's default layout. Its .metadata is a pickle; read it with
# an unpickler that builds nothing but the classes DCP writes there.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {(_DCP_METADATA, name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be restricted too
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which DCP never writes there")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP never writes there")

    def _load_build(self):
        if isinstance(self.stack[-2], type):  # BUILD on a class would set attributes of the class itself
            raise pickle.UnpicklingError("it modifies a class")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def read_legacy_metadata(path: Path):
    """The ``.metadata`` of a format-1 checkpoint, unpickled with the allow-list above."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise _damaged(Path(path), ".metadata is missing") from None
    except Exception as e:  # noqa: BLE001 - any failure of a tampered or truncated pickle
        raise _damaged(Path(path), f".metadata is not DCP metadata, refused without running it "
                                   f"({' '.join(str(e).split())[:160] or type(e).__name__})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
            metadata.storage_data, dict):
        raise _damaged(Path(path), ".metadata is not DCP metadata")
    return metadata


def _legacy_values(path: Path, metadata) -> dict:
    """The plain values (step, counters, data position) of a format-1 checkpoint. DCP stored each one
    with torch.save; they are read with torch.load(weights_only=True), which builds plain data only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    where = {index.fqn: info for index, info in metadata.storage_data.items()}
    values: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, BytesStorageMetadata) or not key.startswith(("trainer.", "ema.num_updates", "data.")):
            continue
        info = where.get(key)
        if info is None:
            raise _damaged(path, f".metadata has no storage for '{key}'")
        file = path / str(info.relative_path)
        with open(file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            value = torch.load(io.BytesIO(raw), weights_only=True)
        except Exception:  # noqa: BLE001
            raise _damaged(path, f"{file.name} holds a value for '{key}' that is not plain data (refused without "
                                 f"running it)") from None
        parts = key.split(".")
        if parts[0] == "data" and len(parts) > 2 and parts[1] == "skipped":
            parts = ["data", "skipped", ".".join(parts[2:])]  # skip reasons may hold dots
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return values


def _tensor_planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        """Reads tensors only: an entry stored as a pickled object is refused, never unpickled."""

        refused: str | None = None

        def load_bytes(self, read_item, value) -> None:
            self.refused = read_item.dest_index.fqn
            raise CheckpointError(f"'{self.refused}' is stored as a pickled object")

    return TensorsOnly()


def _legacy_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class LegacyReader(FileSystemReader):
        """DCP's reader with the allow-list unpickler for .metadata (tensors: torch.load(weights_only=True))."""

        current_file: str | None = None

        def read_metadata(self, *args, **kwargs):
            metadata = read_legacy_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file, sinfo):
            self.current_file = Path(getattr(file, "name", "")).name or None
            return super()._slice_file(file, sinfo)

    return LegacyReader(path)


def _tensor_leaves(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict):
            inner = _tensor_leaves(value)
            if inner:
                out[key] = inner
    return out


def load_checkpoint(path: str | Path, state: dict) -> dict:
    """Fill the tensors of ``state`` in place from a checkpoint (only the keys present in ``state`` are
    read); returns the checkpoint's other values (state.json: step, counters, data position)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = find_checkpoint(path)
    meta = verify_checkpoint(path)
    legacy = meta.get("format", 1) == 1
    reader = _legacy_reader(path) if legacy else HuggingFaceStorageReader(str(path))
    planner = _tensor_planner()
    try:
        import torch.distributed as dist

        single = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(_tensor_leaves(state), storage_reader=reader, planner=planner, no_dist=single)
    except (Exception, CheckpointException) as e:  # DCP wraps the cause (size mismatch, missing key); a BaseException
        if isinstance(e, CheckpointDamaged):
            raise
        detail = " ".join(str(e).split())
        if planner.refused:
            raise _damaged(path, f"'{planner.refused}' is stored as a pickled object where a tensor belongs "
                                 f"(refused without running it)") from None
        if "Weights only load failed" in detail or "UnpicklingError" in detail:
            raise _damaged(path, f"{getattr(reader, 'current_file', None) or 'a tensor file'} holds something other "
                                 f"than tensors (refused without running it)") from None
        if "SafetensorError" in detail or "safetensors" in detail.lower():
            raise _damaged(path, f"a tensor file cannot be read ({detail[:160]})") from None
        for marker in ("Size mismatch", "Missing key", "missing key", "Unexpected key"):
            if marker in detail:
                detail = detail[detail.rindex(marker):]  # the last one: DCP's message after its traceback
                break
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model ({detail[:200]}): it was written with a different "
            f"model config; sample it with its own config or start a new run with --out"
        ) from None
    return _legacy_values(path, read_legacy_metadata(path)) if legacy else _read_json(path / STATE)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _finalize(root: Path, tmp: Path, step: int, config: Config, keep: int, meta: dict) -> Path:
    """Make a fully written checkpoint visible: metadata, rename into place, switch `latest`, prune."""
    name = step_dir_name(step)
    final = root / name
    files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
    config.save(tmp / CONFIG)
    (tmp / META).write_text(json.dumps({"step": step, "time": time.time(), "format": FORMAT, "files": files, **meta}))
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


def make_room(root: Path, keep: int, log=print, free_bytes=_free_bytes) -> None:
    """Before a save, where the disk has less room than the newest checkpoint takes: delete, oldest first, the
    checkpoints this save would prune once complete (``keep``: ``train.keep_checkpoints``), until it fits. The
    newest is never among them, so a failed write still leaves it. A run then needs room for ``keep``
    checkpoints at the peak instead of ``keep`` + 1."""
    steps = _step_dirs(root)
    if not steps:
        return
    need, free = _dir_bytes(steps[-1]), free_bytes(root)
    for old in steps[:len(steps) - max(keep - 1, 1)]:
        if free is None or free >= need:
            return
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

    def __init__(self, run_dir: str | Path, info=None, keep: int = 2, asynchronous: bool = False):
        from prx.distributed import DistInfo

        self.root = Path(run_dir) / "checkpoints"
        self.info = info or DistInfo()
        self.keep = keep
        self.asynchronous = asynchronous
        self.pending = None  # (future, tmp, step, config, meta)
        self.last: Path | None = None
        self.group = None
        if not self.info.enabled:
            # one process: DCP warns on every save that there is no process group, also from the
            # background writer thread, where a catch_warnings() block of this thread cannot reach
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        if asynchronous and self.info.enabled:
            import torch.distributed as dist

            # the background writer's collectives must not interleave with training's: a group of its own
            self.group = dist.new_group(backend="gloo")

    def save(self, step: int, state: dict, config: Config, meta: dict | None = None, log=print) -> Path | None:
        """Write ``state`` as checkpoint ``step``; ``meta`` (JSON) goes into its meta.json; ``log`` says what
        :func:`make_room` removed first."""
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        from prx.distributed import all_agree

        self.wait()
        tensors, values = split_state(state)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        failure = None
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                make_room(self.root, self.keep, log)
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
        from prx.distributed import all_agree, barrier

        barrier(self.info)  # every rank's shards are on disk
        final = self.root / step_dir_name(step)
        failure = None
        if self.info.is_main:
            try:
                _finalize(self.root, tmp, step, config, self.keep, meta)
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
        from prx.distributed import all_agree

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
