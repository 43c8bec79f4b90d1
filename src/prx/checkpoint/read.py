"""Finding and reading checkpoints: which one (a run's newest intact one), whether its files are intact (before any
tensor is read), and its tensors, config and values. Loading runs no code from a checkpoint: tensors come from
safetensors files, everything else from JSON and YAML."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from prx.checkpoint.legacy import legacy_reader, legacy_values, read_legacy_metadata
from prx.config import Config, config_from_saved, read_yaml
from prx.config.model import ModelConfig, same_model
from prx.errors import CheckpointDamaged, CheckpointError, ConfigError, PrxError
from prx.rundir import RunDir, step_of

FORMAT = 2  # safetensors shards + state.json; format 1 (no "format" in meta.json): DCP's default pickled layout
META, STATE, CONFIG = "meta.json", "state.json", "config.yaml"
DAMAGED_PREFIX = ".damaged_"


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
    for root in (RunDir(path).checkpoints, path):
        steps = _step_dirs(root) if root.is_dir() else []
        if steps:
            return steps[-1].resolve()
    raise CheckpointError(
        f"no complete checkpoint under '{path}': pass a run directory with checkpoints/ or a checkpoint "
        f"directory (it holds meta.json and config.yaml)"
    )


def has_checkpoint(run_dir: str | Path) -> bool:
    root = RunDir(run_dir).checkpoints
    return root.is_dir() and bool(_step_dirs(root))


def newest_intact(root: Path, log=print, move_aside: bool = True, skip: set[str] | frozenset = frozenset(),
                  verb: str = "resuming from") -> Path:
    """The newest checkpoint under ``root`` that :func:`verify_checkpoint` accepts (not named in ``skip``). Damaged
    newer ones are reported (and, with ``move_aside``, renamed to ``.damaged_step_N`` so nothing reads them again)."""
    damaged: list[tuple[Path, CheckpointDamaged]] = []
    for path in reversed([p for p in _step_dirs(root) if p.name not in skip]):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            damaged.append((path, e))
            continue
        for bad, error in damaged:
            aside = set_aside_damaged(bad) if move_aside else None
            log(f"warning: {error}; {verb} {path.name}, the newest intact checkpoint"
                + (f" (the damaged one is kept as {aside})" if move_aside else ""))
        return path.resolve()
    raise CheckpointDamaged(f"no intact checkpoint under '{root}' ({damaged[0][1]}): start a new run with --out, or "
                            f"restore the files") if damaged else CheckpointError(f"no checkpoint under '{root}'")


def set_aside_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint to ``.damaged_step_N`` beside it, so nothing reads it again."""
    aside = path.parent / f"{DAMAGED_PREFIX}{path.name}"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(path, aside)
    except OSError:
        pass  # another rank moved it
    return aside


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_checkpoint(path: str | Path, use, log=_warn):
    """``use(checkpoint directory)`` for the checkpoint ``path`` names. A checkpoint directory is used as it is (a
    damaged one is an error naming its file). A run directory (or its ``checkpoints/``) gives its newest intact
    checkpoint; one found damaged while it is read, or pruned meanwhile by the training that writes the run, gives
    way to the next newest, saying so (``sample``, ``eval`` and ``export`` on a run that is training)."""
    path = Path(path)
    if path.exists() and not _is_complete(path):
        root = next((r for r in (RunDir(path).checkpoints, path) if r.is_dir() and _step_dirs(r)), None)
        skip: set[str] = set()
        failure: BaseException | None = None
        for _ in range(8) if root is not None else ():
            try:
                ckpt = newest_intact(root, log, move_aside=False, skip=skip, verb="using")
            except CheckpointError:
                if failure is not None:  # none left besides the one that failed: its error
                    raise failure from None
                raise
            if failure is not None:
                log(f"warning: {failure}; using {ckpt.name}")
            try:
                return use(ckpt)
            except (CheckpointError, OSError) as e:
                gone = not (ckpt / META).is_file()
                if not (gone or isinstance(e, CheckpointDamaged)):
                    raise
                skip.add(ckpt.name)
                failure = CheckpointError(f"{ckpt.name} was removed while it was read (pruned by the training that "
                                          f"writes the run)") if gone else e
    return use(find_checkpoint(path))


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was written with (older prx versions' configs migrated, see migrate_saved_config)."""
    path = find_checkpoint(path)
    try:
        data = read_yaml(path / CONFIG)
    except ConfigError as e:
        raise CheckpointDamaged(f"checkpoint '{path}' is damaged: {CONFIG} cannot be read ({e})") from None
    try:
        return config_from_saved(data)
    except PrxError as e:
        raise CheckpointError(f"checkpoint '{path}' has a config this prx cannot read ({e})") from None


def checkpoint_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint (its step, format, files), once the checkpoint is known to be intact."""
    return verify_checkpoint(find_checkpoint(path))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged.at(path.parent, f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        detail = " ".join(str(e).split())[:120]
        raise CheckpointDamaged.at(path.parent, f"{path.name} is not valid JSON ({detail})") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged.at(path.parent, f"{path.name} does not hold a JSON object")
    return data


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def read_safetensors_header(path: Path, size: int) -> tuple[bytes, dict]:
    """A tensor file's JSON header (its bytes and parsed), checked against the file: every tensor's byte range
    holds exactly its dtype × shape, the ranges tile the data without gaps or overlaps, and the data ends at the end
    of the file. Anything else is :class:`CheckpointDamaged`, naming the file and the tensor."""
    ckpt = path.parent
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointDamaged.at(ckpt, f"{path.name} is truncated ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 256 * 2**20):
            raise CheckpointDamaged.at(ckpt, f"{path.name} has a corrupt header (claims {n} header bytes in a "
                                             f"{size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ranges = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k, v)
                        for k, v in header.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointDamaged.at(ckpt, f"{path.name} has a corrupt header (not a safetensors JSON header)") from None
    end = 0
    for start, stop, name, info in ranges:
        shape, itemsize = info.get("shape"), _ITEMSIZE.get(info.get("dtype"))
        if itemsize is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointDamaged.at(ckpt, f"{path.name} has a corrupt header (tensor '{name}' has no valid dtype "
                                             f"and shape)")
        if start != end or stop - start != math.prod(shape) * itemsize:
            raise CheckpointDamaged.at(ckpt, f"{path.name} has a corrupt header (tensor '{name}': shape {shape} "
                                             f"{info.get('dtype')} does not match its bytes {start}..{stop})")
        end = stop
    if 8 + n + end != size:
        raise CheckpointDamaged.at(ckpt, f"{path.name} is truncated or has extra bytes ({size} bytes, its header "
                                         f"describes {8 + n + end})")
    return raw, header


def header_digest(raw: bytes) -> str:
    """What meta.json records of each tensor file's header (``headers``): a header altered later, even one that
    still describes its bytes, no longer matches."""
    return hashlib.sha256(raw).hexdigest()


def verify_checkpoint(path: Path) -> dict:
    """Check a checkpoint's files before reading any tensor: meta.json, config.yaml and state.json
    parse, every tensor file is there with the size it was written with and a well-formed header.
    Returns meta.json; raises :class:`CheckpointDamaged` naming the file otherwise."""
    path = Path(path)
    try:
        return _verify(path)
    except OSError as e:  # unreadable, or moved away while being read
        raise CheckpointDamaged.at(path, f"{Path(e.filename or '?').name} cannot be read ({e.strerror or e})") from None


def _verify(path: Path) -> dict:
    meta = _read_json(path / META)
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointDamaged.at(path, f"{META} has no valid step")
    try:
        read_yaml(path / CONFIG)
    except ConfigError as e:
        raise CheckpointDamaged.at(path, f"{CONFIG} cannot be read ({e})") from None
    fmt = meta.get("format", 1)
    if fmt == FORMAT:
        _read_json(path / STATE)
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointDamaged.at(path, f"{META} lists no tensor files")
        for name, size in files.items():
            file = path / str(name)
            if "/" in str(name) or not file.is_file():
                raise CheckpointDamaged.at(path, f"{name} is missing")
            actual = file.stat().st_size
            if actual != size:
                raise CheckpointDamaged.at(path, f"{name} is truncated or altered ({actual} bytes, written with "
                                                 f"{size})")
            raw, _ = read_safetensors_header(file, actual)
            recorded = (meta.get("headers") or {}).get(name)  # (not in checkpoints of older prx versions)
            if recorded is not None and recorded != header_digest(raw):
                raise CheckpointDamaged.at(path, f"{name} has a header that differs from the one it was written with "
                                                 f"(tensor names, shapes or offsets altered)")
        extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in files)
        if extra:
            raise CheckpointDamaged.at(path, f"{extra[0]} was not written with it (an extra tensor file)")
    elif fmt == 1:
        metadata = read_legacy_metadata(path)
        for info in metadata.storage_data.values():
            name = str(info.relative_path)
            file = path / name
            if "/" in name or name.startswith(".") or not file.is_file():
                raise CheckpointDamaged.at(path, f"{name} is missing")
            if info.offset + info.length > file.stat().st_size:
                raise CheckpointDamaged.at(path, f"{name} is truncated ({file.stat().st_size} bytes, needs "
                                     f"{info.offset + info.length})")
    else:
        raise CheckpointError(f"checkpoint '{path}' has format {fmt!r}, unknown to this prx: use the prx that wrote it")
    return meta


def _tensor_planner():

    class TensorsOnly(DefaultLoadPlanner):
        """Reads tensors only: an entry stored as a pickled object is refused, never unpickled."""

        refused: str | None = None

        def load_bytes(self, read_item, value) -> None:
            self.refused = read_item.dest_index.fqn
            raise CheckpointError(f"'{self.refused}' is stored as a pickled object")

    return TensorsOnly()


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


def load_checkpoint(path: str | Path, state: dict, model_config: ModelConfig | None = None) -> dict:
    """Fill the tensors of ``state`` in place from a checkpoint (only the keys present in ``state`` are
    read); returns the checkpoint's other values (state.json: step, counters, data position). ``model_config``: the
    model ``state`` belongs to; a tensor that does not fit it, in a checkpoint written with that very model, makes
    the checkpoint damaged, not "of a different model config"."""

    path = find_checkpoint(path)
    meta = verify_checkpoint(path)
    legacy = meta.get("format", 1) == 1
    reader = legacy_reader(path) if legacy else HuggingFaceStorageReader(str(path))
    planner = _tensor_planner()
    try:
        single = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(_tensor_leaves(state), storage_reader=reader, planner=planner, no_dist=single)
    except (Exception, CheckpointException) as e:  # DCP wraps the cause (size mismatch, missing key); a BaseException
        if isinstance(e, CheckpointDamaged):
            raise
        detail = " ".join(str(e).split())
        if planner.refused:
            raise CheckpointDamaged.at(path, f"'{planner.refused}' is stored as a pickled object where a tensor "
                                             f"belongs "
                                 f"(refused without running it)") from None
        if "Weights only load failed" in detail or "UnpicklingError" in detail:
            raise CheckpointDamaged.at(path, f"{getattr(reader, 'current_file', None) or 'a tensor file'} holds "
                                             f"something other "
                                 f"than tensors (refused without running it)") from None
        if "SafetensorError" in detail or "safetensors" in detail.lower():
            raise CheckpointDamaged.at(path, f"a tensor file cannot be read ({detail[:160]})") from None
        for marker in ("Size mismatch", "Missing key", "missing key", "Unexpected key"):
            if marker in detail:
                detail = detail[detail.rindex(marker):]  # the last one: DCP's message after its traceback
                break
        if not (path / META).is_file():
            raise CheckpointDamaged.at(path, "its files were removed while they were read") from None
        if model_config is not None and same_model(checkpoint_config(path).model, model_config):
            raise CheckpointDamaged.at(path, f"its tensor files do not match the model config it was written with "
                                             f"({detail[:160]})") from None
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model ({detail[:200]}): it was written with a different "
            f"model config; sample it with its own config or start a new run with --out"
        ) from None
    return legacy_values(path, read_legacy_metadata(path)) if legacy else _read_json(path / STATE)
