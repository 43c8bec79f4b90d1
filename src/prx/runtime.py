"""Device, precision and thread settings shared by training and inference."""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from prx.errors import ConfigError, PrxError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible: use train.device=cpu (or auto)")
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU through pinned memory without waiting: a copy from pageable
    memory synchronises the stream first, so every such copy at the start of a step (images, times, text,
    routes) left the GPU idle until the host had launched work again."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def autocast_dtype(precision: str, device: torch.device, training: bool = True) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` ('auto', 'bf16', 'fp32'); None = fp32.

    'auto': bf16 on GPUs that support it; on a CPU, bf16 for training where bf16 matmuls are
    measured faster than fp32 (AVX512-BF16 / AMX; on AVX2-only CPUs they are ~130× slower), and
    fp32 for inference (sampling is cheap, and fp32 keeps images equal to diffusers' fp32 pipeline).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and training:
        from prx.muon import fast_matmul_dtype

        return fast_matmul_dtype("cpu") if fast_matmul_dtype("cpu") == torch.bfloat16 else None
    return None


def attention_kernel(choice: str, device: torch.device, compiled: bool, dtype: torch.dtype | None,
                     image_tokens: int) -> str:
    """``train.attention`` resolved: 'auto' is 'math' on a CPU for short sequences (≤ 64 image tokens)
    when the blocks are compiled or run in bf16 — there the fused kernel's forward and backward cost 2-3×
    the written-out attention's (``benchmarks/demo_speed.py``) — and 'sdpa' everywhere else (GPUs, long
    sequences, fp32 eager)."""
    if choice != "auto":
        return choice
    short_cpu = device.type == "cpu" and image_tokens <= 64
    return "math" if short_cpu and (compiled or dtype == torch.bfloat16) else "sdpa"


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, if there is one."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def pin_cpu_vector_isa() -> None:
    """Put the vector ISA that torch.compile's CPU backend writes C++ for into its cache keys, before compiling on
    a CPU. A choice the user made (``torch._inductor.config.cpp.simdlen``) stays.

    Inductor picks the ISA per process (the CPU's widest, or ``ATEN_CPU_CAPABILITY``), but its FX graph cache key
    (torch 2.13) leaves the ISA out: the same graph compiled before under another ISA is loaded and built with this
    one's flags. Measured on an AVX-512 CPU with one cache directory: AVX-512 code run as AVX2 gave NaN in blocks
    of 8 lanes, and AVX2 code run as AVX-512 corrupted the heap (``free(): invalid pointer``). That happens with
    ``ATEN_CPU_CAPABILITY=avx2`` (how the README measures an AVX2-only CPU) or with a cache directory shared by
    machines of different CPUs. ``cpp.simdlen`` is part of the key, and set to the picked ISA's width it picks
    the same ISA again (1, no vectors, where none is usable)."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is None:
        isa = pick_vec_isa()
        config.cpp.simdlen = isa.bit_width() if isa else 1


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return (x * 2 + 1).sum()


@functools.cache
def cpu_compile_problem() -> str | None:
    """Why torch.compile cannot build CPU code in this process, in one line, or None where it can. Probed once
    per process by compiling and running a one-line function (a few seconds with a cold inductor cache).

    A C++ compiler on the PATH is not enough: without Python's headers (Debian's python3 without python3-dev)
    or OpenMP inductor's first build fails, and a run that compiled its blocks stopped at step 0 with the
    compiler's trace."""
    if cpp_compiler() is None:
        return "no C++ compiler (g++, c++, clang++ or $CXX) is installed"
    try:
        pin_cpu_vector_isa()
        value = float(torch.compile(_compile_probe, fullgraph=True)(torch.ones(4)))
    except Exception as error:  # a compiler's or inductor's failure, whatever its type
        return _first_error_line(error)
    return None if value == 12.0 else f"a compiled test computed {value} instead of 12"


def _first_error_line(error: Exception) -> str:
    """The line of a (compiler's) error message that says what went wrong: the first that names an error after
    the command's output, else the message's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    output = lines[lines.index("Output:") + 1:] if "Output:" in lines else lines
    named = [line for line in output if "error" in line.lower()]
    line = (named or output or [type(error).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


# glibc's mallopt() parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
KEPT_FREE_BYTES = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make this process's C allocator keep the memory torch frees for its next allocation, as the CUDA
    caching allocator does on a GPU. Linux with glibc only (elsewhere nothing changes); returns whether it did.

    A CPU training step frees and allocates the same activations every step. By default glibc serves an
    allocation above 128 KiB with a fresh ``mmap`` and hands a freed heap top back to the OS, so each step
    faults those pages in again and the kernel zeroes them: 7,500 page faults and 12 ms of system time per
    demo step on 2 cores, 3% of the step (README, The demo's step on a CPU). With the mmap threshold at its
    maximum (32 MiB) and up to 1 GiB of free heap kept, the step faults in nothing.
    """
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


def cache_root() -> Path:
    """Where prx keeps derived files it can rebuild (``$PRX_CACHE``, default ``~/.cache/prx``)."""
    return Path(os.environ.get("PRX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prx")))


def make_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` and prove it writable, or fail with a one-line fix. The probe file has a
    unique name: every rank of a run checks the same directory at the same time."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        raise PrxError(f"cannot write to {what} '{path}' ({e.strerror}): choose another with --out") from None
    return path


class RunLock:
    """The run directory's lock: an exclusive ``flock`` on ``RUN/.lock``, held by the training that
    writes the run for as long as it runs. A second training into the same directory fails at once
    with the holder's PID and host. The kernel releases the lock when its process ends in any way
    (a crash, ``kill -9``), so a stale lock never blocks a resume. Under torchrun rank 0 holds it.

    Within one process the lock is re-entrant (a ``Trainer`` set up again in the same Python session
    reuses it); it is released when the last holder releases it or is garbage-collected.
    """

    NAME = ".lock"
    _held: dict[str, list] = {}  # lock file → [fd, holders], this process's locks

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self.key: str | None = None

    @classmethod
    def for_run(cls, run_dir: str | Path, info) -> "RunLock | None":
        """Rank 0 takes the lock (before any rank writes in the run directory); every rank learns the
        outcome and fails alike when another training holds it. The lock on rank 0, None elsewhere."""
        from prx.distributed import rank0_outcome

        lock, error = None, None
        if info.is_main:
            try:
                lock = cls(run_dir).acquire()
            except PrxError as e:
                error = str(e)
        error = rank0_outcome(error, info)
        if error:
            raise PrxError(error)
        return lock

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import socket
        import time
        import weakref

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
        import json

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
        import fcntl

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


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, where) a process can still allocate: free GPU memory, or the machine's MemAvailable."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
    except (ValueError, OSError, AttributeError):
        return 2**62, "available RAM"


# bytes per parameter: fp32 weights; training adds gradients, two Adam moments (Muon keeps one) and the EMA copy
BYTES_PER_PARAM = {"inference": 4, "training": 4 + 4 + 8 + 4}


def check_memory(params: int, device: torch.device, use: str, what: str, shards: int = 1) -> None:
    """Fail before allocating when ``params`` parameters cannot fit: a one-line message with the count,
    the memory they need (without activations) and what is available. ``shards``: FSDP ranks that
    share the state on one GPU each (CPU ranks share one machine's RAM)."""
    need = params * BYTES_PER_PARAM[use] // (shards if device.type == "cuda" else 1)
    available, where = available_memory(device)
    if need > available:
        gib = 2**30
        count = next(f"{params / d:.3g}{u}" for u, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("", 1)) if params >= d or u == "")
        raise PrxError(f"{what} has {count} parameters: {use} needs {need / gib:,.1f} GiB for them "
                       f"({BYTES_PER_PARAM[use]} bytes each{', sharded over ' + str(shards) + ' GPUs' if shards > 1 and device.type == 'cuda' else ''}"
                       f", before activations), but {available / gib:,.1f} GiB is {where}: use a smaller model")


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
        import signal

        return 128 + int(getattr(signal, self.received)) if self.received else 0

    def _handle(self, signum, frame) -> None:
        import signal
        import sys

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            what = "interrupt (Ctrl-C)" if name == "SIGINT" else name
            again = " (Ctrl-C again to stop at once)" if name == "SIGINT" else ""
            print(f"\n{what}: finishing this step and saving a checkpoint{again}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        import signal

        for name in self.NAMES:
            try:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
            except ValueError:  # not the main thread: leave the process's handlers alone
                break
        return self

    def __exit__(self, *exc) -> None:
        import signal

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

    def set_steps(self, cfg, steps: int, step: int, dist) -> str:
        """The budget's count becomes the run's ``train.steps``: ranks take the smallest, never fewer
        than ``step`` done, never more than configured, never so few that the LR decay would have
        begun already. Returns the line that says so."""
        from prx.distributed import min_across_ranks
        from prx.optim import decay_start

        steps = max(step, min(self.max_steps, min_across_ranks(steps, dist)))
        while steps < self.max_steps and decay_start(steps, cfg.optimizer) <= step:
            steps += 1
        cfg.train.steps = steps
        budget = f"time budget of {cfg.train.time_budget_minutes:g} min"
        if self.remeasures == 0:  # halfway through the estimate, over the steps since a quarter of it
            at, window_from, room = steps // 2, (step + steps // 2) // 2, 2 * self.MEASURE
        else:  # late, over the steps since the last measurement: a run 10% shorter would not decay yet
            at, window_from, room = decay_start(int(0.9 * steps), cfg.optimizer) - 1, step, self.MEASURE
        if self.remeasures < 2 and at - step >= room and decay_start(steps, cfg.optimizer) > at:
            self.remeasures += 1
            self.replan_step, self.window_from = at, window_from  # the same steps on every rank
            self.window_start = self.now() if window_from == step else None
            return (f"{budget}: about {steps} steps (the step rate is measured again at step {at}"
                    f"{', then the count is fixed' if self.remeasures == 2 else ''})")
        self.budget_seconds = 0.0  # planned
        line = (f"{budget}: {steps} steps in all (the LR schedule ends there; train.time_budget_minutes=0 "
                f"train.steps={steps} repeats it)")
        return line + budget_advice(cfg.train, steps)


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


def preflight(cfg, model_given: bool = False) -> torch.device:
    """What can fail before any work, in one line each: W&B missing, a batch that does not split over
    torchrun's ranks, a model that cannot fit in memory (estimated from the config). The device."""
    from prx.distributed import DistInfo, resolve_parallel, world_size_from_env
    from prx.logger import require_wandb
    from prx.model import param_count

    require_wandb(cfg.logging)
    world = world_size_from_env()
    cfg.check_world(world)
    device = resolve_device(cfg.train.device)
    if not model_given:
        m = cfg.model
        sharded = resolve_parallel(cfg.train.parallel, DistInfo(world=world)) == "fsdp"
        check_memory(param_count(m), device, "training", f"the model (model.hidden_dim={m.hidden_dim}, "
                     f"model.num_layers={m.num_layers}, model.patch_size={m.patch_size})", shards=world if sharded else 1)
    return device
