"""Checkpoints: the one module that knows what a checkpoint holds, under which names, and where.

Written with ``torch.distributed.checkpoint`` (one process, or sharded under FSDP2) and made
atomic: a checkpoint is written to a hidden temporary directory and renamed into place only when
complete, then ``checkpoints/latest`` (a symlink) is switched to it. A crash at any moment leaves
the previous checkpoint intact and reachable.

Layout::

    RUN/config.yaml                   resolved config of the run
    RUN/checkpoints/step_00001000/    .metadata + *.distcp (DCP), config.yaml, meta.json
    RUN/checkpoints/latest -> step_00001000

State, by key (:func:`training_state`)::

    model.denoiser.*, model.repa_projector.*   the trained modules (the projector only with REPA)
    optimizer.*                                Muon and Adam state (torch's get_state_dict layout)
    ema.model.*, ema.num_updates               the EMA copy of the denoiser: what sampling uses
    trainer.step, trainer.bad_steps
    data.*                                     the data source's exact position
    rng.torch
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from prx.config import Config, config_from_dict, read_yaml
from prx.errors import CheckpointError, PrxError

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory holds (from its name)."""
    return int(Path(path).name.split("_")[1])


# --------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------


def training_state(trainer) -> dict:
    """Everything a run needs to continue exactly, in the layout above (tensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers)
    return {
        "model": model_state,
        "optimizer": optim_state,
        "ema": trainer.ema.state_dict(),
        "trainer": {"step": trainer.step, "bad_steps": trainer.bad_steps},
        "data": trainer.data.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
    }


def restore_training_state(trainer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = training_state(trainer)
    load_checkpoint(path, state)
    set_state_dict(trainer.trainable, trainer.optimizer.optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.step = int(state["trainer"]["step"])
    trainer.bad_steps = int(state["trainer"]["bad_steps"])
    trainer.data.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"]["torch"])


def load_weights(path: str | Path, model: torch.nn.Module, weights: str = "ema") -> Path:
    """Fill a (full, unsharded) denoiser with a checkpoint's EMA or raw weights, whatever world size
    wrote it; returns the checkpoint directory. For sampling, export and evaluation."""
    if weights not in ("ema", "model"):
        raise ValueError("weights must be 'ema' or 'model'")
    tensors = model.state_dict()
    state = {"ema": {"model": tensors}} if weights == "ema" else {"model": {f"denoiser.{k}": v for k, v in tensors.items()}}
    return load_checkpoint(path, state)


# --------------------------------------------------------------------------------------------
# Where checkpoints are
# --------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.json").is_file() and (path / "config.yaml").is_file()


def _step_dirs(root: Path) -> list[Path]:
    dirs = [p for p in root.glob("step_*") if p.is_dir() and _is_complete(p)]
    return sorted(dirs, key=step_of)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` directory or a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist: pass a run directory or a checkpoint directory")
    if _is_complete(path):
        return path.resolve()
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.exists() and _is_complete(latest):
            return latest.resolve()
        steps = _step_dirs(root) if root.is_dir() else []
        if steps:
            return steps[-1].resolve()
    raise CheckpointError(
        f"no complete checkpoint under '{path}': pass a run directory with checkpoints/ or a checkpoint "
        f"directory (it holds .metadata, meta.json and config.yaml)"
    )


def has_checkpoint(run_dir: str | Path) -> bool:
    try:
        find_checkpoint(Path(run_dir) / "checkpoints")
        return True
    except CheckpointError:
        return False


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


def checkpoint_to_resume(run_dir: Path, resume: bool | None, config: Config) -> Path | None:
    """The run directory's newest checkpoint to continue from (None: a new run), after the checks:
    ``resume`` True requires one, False forbids one, None takes one if there is one; a checkpoint
    of another model shape is refused."""
    from prx.runtime import make_writable_dir

    exists = has_checkpoint(run_dir)
    if resume is True and not exists:
        raise CheckpointError(f"--resume given but '{run_dir}' has no checkpoint: drop --resume to start a new run there")
    if resume is False and exists:
        raise CheckpointError(f"'{run_dir}' already holds a run: resume it (drop the flag that forbids it) or choose --out")
    make_writable_dir(run_dir, "run directory")
    if not exists:
        return None
    path = find_checkpoint(run_dir / "checkpoints")
    saved, model = checkpoint_config(path).model, config.model
    model.norm_eps = saved.norm_eps  # the weights' own (1e-5 in runs from before the option)
    shape = dict(text_dim=None, init_from=None)  # init_from says how a run started, not what it is
    if replace(saved, **shape) != replace(model, **shape) or (
            model.text_dim is not None and saved.text_dim != model.text_dim):
        raise CheckpointError(f"'{run_dir}' holds a run with a different model config: use --out for a new run, or the "
                              f"run's own config ({run_dir / 'config.yaml'})")
    return path


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was written with (older prx versions' configs migrated, see migrate_saved_config)."""
    path = find_checkpoint(path)
    try:
        return config_from_dict(migrate_saved_config(read_yaml(path / "config.yaml")))
    except PrxError as e:
        raise CheckpointError(f"checkpoint '{path}' has a config this prx cannot read ({e})") from None


def checkpoint_meta(path: str | Path) -> dict:
    return json.loads((find_checkpoint(path) / "meta.json").read_text())


def _finalize(root: Path, tmp: Path, step: int, config: Config, keep: int, meta: dict) -> Path:
    """Make a fully written checkpoint visible: metadata, rename into place, switch `latest`, prune."""
    name = step_dir_name(step)
    final = root / name
    config.save(tmp / "config.yaml")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **meta}))
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


class CheckpointWriter:
    """Writes checkpoints from every rank (DCP is collective); rank 0 makes them visible.

    With ``asynchronous`` the state is staged in memory and written in the background while
    training goes on; the checkpoint becomes visible (renamed, `latest` switched) once every rank
    has finished writing, which :meth:`poll` checks each step. One save is in flight at a time.
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

    def save(self, step: int, state: dict, config: Config, meta: dict | None = None) -> Path | None:
        """Write ``state`` as checkpoint ``step``; ``meta`` (JSON) goes into its meta.json."""
        from prx.distributed import barrier

        self.wait()
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(self.info)
        single = not self.info.enabled  # one process: no collectives (and no warning that there are none)
        if self.asynchronous:
            response = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group, no_dist=single)
            self.pending = (getattr(response, "upload_completion", response), tmp, step, config, meta or {})
            return None
        dcp.save(state, checkpoint_id=tmp, no_dist=single)
        return self._finish(tmp, step, config, meta or {})

    def _finish(self, tmp: Path, step: int, config: Config, meta: dict) -> Path:
        from prx.distributed import barrier

        barrier(self.info)  # every rank's shards are on disk
        final = self.root / step_dir_name(step)
        if self.info.is_main:
            _finalize(self.root, tmp, step, config, self.keep, meta)
        barrier(self.info)
        self.last = final
        return final

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
        future.result()
        return self._finish(tmp, step, config, meta)


def load_checkpoint(path: str | Path, state: dict) -> Path:
    """Fill ``state`` in place from a checkpoint (only the keys present in ``state`` are read)."""
    path = find_checkpoint(path)
    try:
        import torch.distributed as dist

        single = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=single)
    except (Exception, CheckpointException) as e:  # DCP wraps the cause (size mismatch, missing key); a BaseException
        detail = " ".join(str(e).split())
        for marker in ("Size mismatch", "Missing key", "missing key", "Unexpected key"):
            if marker in detail:
                detail = detail[detail.index(marker):]
                break
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model ({detail[:200]}): it was written with a different "
            f"model config; sample it with its own config or start a new run with --out"
        ) from None
    return path
