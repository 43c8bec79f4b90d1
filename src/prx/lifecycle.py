"""A training run's life: the lock that makes its directory its own, the signals that stop it cleanly, the clocks
that end it on time, and the checks that fail before any work."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import sys
import time
import weakref
from pathlib import Path

import torch

from prx.config import Config, StageConfig
from prx.device import check_memory, resolve_device
from prx.distributed import min_across_ranks, rank0_outcome, world_size_from_env
from prx.errors import PrxError, TrainingError
from prx.execution import resolve_parallel
from prx.files import make_writable_dir
from prx.logger import require_wandb
from prx.model import param_count
from prx.optim import decay_start
from prx.rundir import RunDir


class RunLock:
    """The run directory's lock: an exclusive ``flock`` on ``RUN/.lock``, held by the training that
    writes the run for as long as it runs. A second training into the same directory fails at once
    with the holder's PID and host. The kernel releases the lock when its process ends in any way
    (a crash, ``kill -9``), so a stale lock never blocks a resume. Under torchrun rank 0 holds it.

    Within one process the lock is re-entrant (a ``Trainer`` set up again in the same Python session
    reuses it); it is released when the last holder releases it or is garbage-collected.
    """

    _held: dict[str, list] = {}  # lock file → [fd, holders], this process's locks

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = RunDir(run_dir).lock
        self.key: str | None = None

    @classmethod
    def for_run(cls, run: RunDir, info) -> "RunLock | None":
        """Rank 0 takes the lock (before any rank writes in the run directory); every rank learns the
        outcome and fails alike when another training holds it. The lock on rank 0, None elsewhere."""
        lock, error = None, None
        if info.is_main:
            try:
                lock = cls(run.root).acquire()
            except PrxError as e:
                error = str(e)
        error = rank0_outcome(error, info)
        if error:
            raise PrxError(error)
        return lock

    def acquire(self) -> "RunLock":
        if self.key is not None:
            return self
        make_writable_dir(self.run_dir, "run directory")
        key = os.path.realpath(self.path)
        if key in self._held:
            self._held[key][1] += 1
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise PrxError(f"run directory '{self.run_dir}' is in use by another training ({holder}): wait for it "
                               f"to finish or stop it, or train into another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
            self._held[key] = [fd, 1]
        self.key = key
        self._finalizer = weakref.finalize(self, RunLock._release, key)
        return self

    @staticmethod
    def _holder(fd: int, wait_seconds: float = 1.0) -> str:
        """Who holds the lock. The holder writes its PID just after taking the lock; on a loaded machine
        that can take a moment (seen on 2 cores with two trainings starting together), so read again for
        up to ``wait_seconds`` before saying it has not."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode())
                return f"PID {info['pid']} on host {info['host']}, since {info['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    return "a process that has not written its PID yet"
                time.sleep(0.02)

    @classmethod
    def _release(cls, key: str) -> None:
        entry = cls._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del cls._held[key]
            try:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            finally:
                os.close(entry[0])

    def release(self) -> None:
        if self.key is not None:
            self._finalizer.detach()
            RunLock._release(self.key)
            self.key = None


class StopSignals:
    """Signals that ask a run to finish its current step, write a checkpoint and exit: Ctrl-C
    (SIGINT), SIGTERM (what Slurm, Kubernetes, spot instances and torchrun send) and SIGUSR1 (Slurm's
    warning before a time limit, ``--signal=USR1@120``). A second Ctrl-C stops at once (the last
    checkpoint stays intact). Each exits with its own code (128 + the signal number)."""

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous: dict = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.received)) if self.received else 0

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            what = "interrupt (Ctrl-C)" if name == "SIGINT" else name
            again = " (Ctrl-C again to stop at once)" if name == "SIGINT" else ""
            print(f"\n{what}: finishing this step and saving a checkpoint{again}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        for name in self.NAMES:
            try:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
            except ValueError:  # not the main thread: leave the process's handlers alone
                break
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()


class RunClock:
    """The run's two clocks. ``train.time_limit_minutes``: a safety net, the run stops (and saves)
    after that long. ``train.time_budget_minutes``: train for about that long. The first ``SKIP``
    steps of a process (compilation, caches) are not timed; the next ``MEASURE`` give a first step
    rate and an estimated step count. A step rate that early is pessimistic (caches still filling), so
    halfway through that estimate the rate is measured again over the steps since a quarter of it,
    and once more, over the steps since then, at the last step where a run 10% shorter would not yet
    have begun its LR decay (a machine that sped up or slowed down since is seen, and the count can
    still shrink by 10% without a decay that should have begun already). Then the steps that fit the
    rest of the budget become the run's step count (at most ``train.steps``). Every count is fixed
    before the LR schedule's decay, which covers the last part of the run, can begin, so the run is
    exactly the run ``train.time_budget_minutes=0 train.steps=N`` trains with its final count N
    (printed, and kept in every checkpoint; a resumed run keeps the count its checkpoint holds).
    ``now`` is the clock (a fake one in tests)."""

    SKIP, MEASURE = 10, 30
    MARGIN = 0.05  # the count aims this much short of the budget: the run's final sample grid and checkpoint,
    # and a step rate that drifts after the last measurement (the demo's training took 10 min 5 s of 10
    # with no margin and again with 2%: the rate moved 4% between the last window and the rest)

    def __init__(self, train_cfg, first_step: int, steps_planned: bool, now=time.monotonic):
        self.now = now
        self.started, self.first_step = now(), first_step
        self.limit_minutes = train_cfg.time_limit_minutes
        self.budget_seconds = 0.0 if steps_planned else train_cfg.time_budget_minutes * 60 * (1 - self.MARGIN)
        self.max_steps = train_cfg.steps  # the configured count: the budget's count never exceeds it
        self.window_from = first_step + self.SKIP  # the step whose end opens the rate's window
        self.window_start: float | None = None
        self.replan_step: int | None = None  # when the rate is measured next (None: not yet known)
        self.remeasures = 0  # how many measurements after the first have been planned (at most 2)

    def limit_reached(self) -> str | None:
        if self.limit_minutes and self.now() - self.started > self.limit_minutes * 60:
            return f"time limit of {self.limit_minutes:g} min reached"
        return None

    def plan(self, step: int) -> int | None:
        """Call after each step (``step`` steps done): a step count for :meth:`set_steps` when the
        budget has one (an estimate, measured again twice, then the final count), else None."""
        if not self.budget_seconds:
            return None
        if step == self.window_from:
            self.window_start = self.now()
        first = self.replan_step is None and step == self.first_step + self.SKIP + self.MEASURE
        if (first or step == self.replan_step) and self.window_start is not None:
            rate = (step - self.window_from) / max(self.now() - self.window_start, 1e-9)
            return step + max(0, int((self.budget_seconds - (self.now() - self.started)) * rate))
        return None

    def fix_steps(self, cfg: Config, steps: int, step: int, dist) -> tuple[int, str]:
        """The budget's count, the run's step count from now on: ranks take the smallest, never fewer than ``step``
        done, never more than configured, never so few that the LR decay would have begun already. Returns it with
        the line that says so."""
        steps = max(step, min(self.max_steps, min_across_ranks(steps, dist)))
        while steps < self.max_steps and decay_start(steps, cfg.optimizer) <= step:
            steps += 1
        budget = f"time budget of {cfg.train.time_budget_minutes:g} min"
        if self.remeasures == 0:  # halfway through the estimate, over the steps since a quarter of it
            at, window_from, room = steps // 2, (step + steps // 2) // 2, 2 * self.MEASURE
        else:  # late, over the steps since the last measurement: a run 10% shorter would not decay yet
            at, window_from, room = decay_start(int(0.9 * steps), cfg.optimizer) - 1, step, self.MEASURE
        if self.remeasures < 2 and at - step >= room and decay_start(steps, cfg.optimizer) > at:
            self.remeasures += 1
            self.replan_step, self.window_from = at, window_from  # the same steps on every rank
            self.window_start = self.now() if window_from == step else None
            return steps, (f"{budget}: about {steps} steps (the step rate is measured again at step {at}"
                           f"{', then the count is fixed' if self.remeasures == 2 else ''})")
        self.budget_seconds = 0.0  # planned
        line = (f"{budget}: {steps} steps in all (the LR schedule ends there; train.time_budget_minutes=0 "
                f"train.steps={steps} repeats it)")
        return steps, line + budget_advice(cfg.train, steps)


def budget_advice(train_cfg, steps: int) -> str:
    """What to add to the line that fixes a budget's step count when it is below the config's
    ``train.recommended_steps``: that this machine is slow for the config, and the budget (and time limit) that
    would buy those steps at the rate the count came from. Empty when the budget buys enough."""
    wanted, minutes = train_cfg.recommended_steps, train_cfg.time_budget_minutes
    if not wanted or steps >= wanted or not minutes:
        return ""
    needed = math.ceil(minutes * wanted / max(steps, 1))
    limit = f" train.time_limit_minutes={math.ceil(needed * 1.3)}" if train_cfg.time_limit_minutes else ""
    return (f"\nnote: this CPU fits {steps} steps in {minutes:g} min, fewer than the {wanted} this config is tuned for "
            f"(its results need them); train.time_budget_minutes={needed}{limit} would buy them here")


def preflight(cfg: Config, model_given: bool = False) -> torch.device:
    """What can fail before any work, in one line each: W&B missing, a batch that does not split over
    torchrun's ranks, a model that cannot fit in memory (estimated from the config). The device."""
    require_wandb(cfg.logging)
    world = world_size_from_env()
    cfg.check_world(world)
    device = resolve_device(cfg.train.device)
    if not model_given:
        m = cfg.model
        sharded = resolve_parallel(cfg.train.parallel, world, cfg.lora.enabled) == "fsdp"
        what = (f"the model (model.hidden_dim={m.hidden_dim}, model.num_layers={m.num_layers}, "
                f"model.patch_size={m.patch_size})")
        use = "LoRA fine-tuning" if cfg.lora.enabled else "training"
        check_memory(param_count(m), device, use, what, shards=world if sharded else 1)
    return device


def out_of_memory_error(trainer, stage: StageConfig, error: BaseException) -> TrainingError:
    """One line for a step that ran out of device memory: where, torch's own first line, what to change, and the
    checkpoint the same command resumes from."""
    cfg = trainer.config.train
    micro = trainer.micro_batch_size or stage.batch_size // trainer.dist.world
    lines = str(error).strip().splitlines()
    fixes = [f"lower train.micro_batch_size (gradients accumulate to the batch of {stage.batch_size})"]
    if not cfg.activation_checkpointing:
        fixes.append("set train.activation_checkpointing=true")
    newest = trainer.checkpoints.last or (trainer.resume_from.path if trainer.resume_from else None)
    return TrainingError(
        f"out of {trainer.device.type.upper()} memory in step {trainer.step} ({stage.resolution} px, micro-batch "
        f"{micro} per rank): {lines[0] if lines else 'out of memory'} To fit, {' or '.join(fixes)}; `prx bench CONFIG "
        f"--largest-micro-batch 32,16,8` tries micro-batches in turn. "
        + (f"The same command resumes from {newest.name}." if newest else "No checkpoint was written yet."))
