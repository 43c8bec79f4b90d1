"""Checkpoints: what a checkpoint holds (:mod:`.state`), how one is found, verified and read (:mod:`.read`; format 1
in :mod:`.legacy`) and written (:mod:`.write`).

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
    state.json: trainer.step, trainer.bad_steps, trainer.health, ema.num_updates, data.* (the data position)

A damaged checkpoint (a truncated or altered file, unreadable ``meta.json`` / ``state.json`` /
``config.yaml``) is reported as damaged, naming the file; training then resumes from the newest
intact checkpoint and moves the damaged ones aside (``checkpoints/.damaged_step_N``).
"""

from prx.checkpoint.read import (
                                 CONFIG,
                                 DAMAGED_PREFIX,
                                 FORMAT,
                                 META,
                                 STATE,
                                 checkpoint_config,
                                 checkpoint_meta,
                                 find_checkpoint,
                                 has_checkpoint,
                                 load_checkpoint,
                                 newest_intact,
                                 open_checkpoint,
                                 set_aside_damaged,
                                 verify_checkpoint,
)
from prx.checkpoint.state import load_weights, restore_training_state, split_state, training_state
from prx.checkpoint.write import CheckpointWriter, make_room, write_failure
from prx.rundir import LATEST, step_dir_name, step_of

__all__ = ["CONFIG", "DAMAGED_PREFIX", "FORMAT", "LATEST", "META", "STATE", "CheckpointWriter", "checkpoint_config",
           "checkpoint_meta", "find_checkpoint", "has_checkpoint", "load_checkpoint", "load_weights", "make_room",
           "newest_intact", "open_checkpoint", "restore_training_state", "set_aside_damaged", "split_state",
           "step_dir_name", "step_of", "training_state", "verify_checkpoint", "write_failure"]
