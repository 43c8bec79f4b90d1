"""The machine a process runs on: which device, what it computes fast, whether torch.compile builds for it,
how much memory is left, and the host's threads and allocator. Facts, measured or read once; what a run
does with them is decided in :mod:`prx.execution`."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import sys
import time
import warnings
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


@functools.cache
def fast_matmul_dtype(device_type: str) -> torch.dtype:
    """bf16 where bf16 matmuls are clearly faster than fp32 (GPUs; CPUs with AVX512-BF16 or AMX), else fp32. On a
    CPU without bf16 units a bf16 matmul is emulated, ~130× slower than fp32: picking it wrongly makes a training
    step 15-130× slower. Measured once per process: see :func:`bf16_matmul_speedup`."""
    if device_type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if bf16_matmul_speedup() >= BF16_MARGIN else torch.float32


BF16_MARGIN = 1.25  # bf16 must beat fp32 by this factor, not by a hair: a close call keeps fp32's precision


def bf16_matmul_speedup(size: int = 256, rounds: int = 7) -> float:
    """How many times faster a bf16 matmul is than an fp32 one on this CPU (fp32 time / bf16 time).

    Robust to a loaded machine: each trial is timed in this thread's CPU time on one thread, so time spent
    preempted by other processes does not count, the dtypes alternate (anything that slows one round slows
    both), and each dtype keeps its fastest of ``rounds`` trials. An emulated bf16 (hundreds of ms a
    trial) stops after one round."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a32 = torch.randn(size, size)
        a16 = a32.to(torch.bfloat16)
        best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
        for round_ in range(rounds):
            for a in (a32, a16):
                start = time.thread_time()
                a @ a
                best[a.dtype] = min(best[a.dtype], time.thread_time() - start)
            if round_ and best[torch.bfloat16] > 10 * best[torch.float32]:
                break  # an emulated bf16: no closer call to make
        return max(best[torch.float32], 1e-9) / max(best[torch.bfloat16], 1e-9)
    finally:
        torch.set_num_threads(threads)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, if there is one."""
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
    from torch._inductor import config  # inductor loads only where something compiles
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


def compile_works(device: torch.device, setting: str) -> bool:
    """Whether torch.compile builds for ``device``: on a CPU, where a one-line function compiles and runs
    (:func:`cpu_compile_problem`); else a warning that names ``setting`` and the reason, and the run goes on
    without compiling."""
    if device.type != "cpu":
        return True
    problem = cpu_compile_problem()
    if problem is not None:
        warnings.warn(f"{setting}=on but torch.compile cannot build for this CPU ({problem}): training without "
                      f"compiling. Install a C++ compiler with OpenMP and Python's headers (e.g. g++ and python3-dev), "
                      f"or set {setting}=off to silence this", RuntimeWarning, stacklevel=3)
    return problem is None


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
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


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
# weights, gradients, two Adam moments, the EMA copy; a LoRA fine-tune holds the frozen weights alone (its EMA
# copy shares them; the adapters are ~1%)
BYTES_PER_PARAM = {"inference": 4, "training": 4 + 4 + 8 + 4, "LoRA fine-tuning": 4}


def check_memory(params: int, device: torch.device, use: str, what: str, shards: int = 1) -> None:
    """Fail before allocating when ``params`` parameters cannot fit: a one-line message with the count,
    the memory they need (without activations) and what is available. ``shards``: FSDP ranks that
    share the state on one GPU each (CPU ranks share one machine's RAM)."""
    need = params * BYTES_PER_PARAM[use] // (shards if device.type == "cuda" else 1)
    available, where = available_memory(device)
    if need > available:
        gib = 2**30
        sharded = f", sharded over {shards} GPUs" if shards > 1 and device.type == "cuda" else ""
        count = next(f"{params / d:.3g}{u}" for u, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("", 1))
                     if params >= d or u == "")
        raise PrxError(f"{what} has {count} parameters: {use} needs {need / gib:,.1f} GiB for them "
                       f"({BYTES_PER_PARAM[use]} bytes each{sharded}, before activations), but "
                       f"{available / gib:,.1f} GiB is {where}: use a smaller model")
