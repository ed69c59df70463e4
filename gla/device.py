"""The --device / TrainConfig.device names: "auto" or any name torch.device reads."""
from __future__ import annotations

import functools
import sys
import time

import torch

BF16_MIN_SPEEDUP = 1.5
"""`--dtype auto` trains a CPU under bf16 autocast when its bf16 matmuls run at least this many times faster than
fp32 ones (``cpu_bf16_speedup``). Measured on the 2-core Xeon VM (AMX): 3.6x for the product, the demo's 600 steps
104 -> 68 s with the same validation loss (1.838 / 1.827 nats per byte); CPUs without bf16 matrix units run bf16
products slower than fp32 ones, well under the bound."""


def resolve_device(name: str) -> torch.device:
    """"auto" -> the GPU when CUDA is available, else the CPU; any other name (cpu, cuda, cuda:1) as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'built without CUDA' if torch.version.cuda is None else 'no GPU found'})")
    return device


def constant_to_compiler(fn):
    """``torch.compiler.assume_constant_result(fn)`` (torch.compile traces a call of fn as its value) without that
    function's import of torch._dynamo, 0.9 of the 1.8 s `import gla` took on a 2-core Xeon, which eager work never
    needs: while dynamo is not loaded, the attribute it reads when it traces a call (the public function sets only
    that, torch 2.6 to 2.13; tests/models/test_compile.py compiles both users without a graph break)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def hold_freed_host_memory() -> bool:
    """Have glibc's malloc serve blocks up to 1 GiB from its heap and keep what is freed there for reuse (mallopt
    M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), instead of mapping every block of 32 MiB or more afresh and handing freed
    pages back to the OS, which made each training step on the CPU page-fault its buffers in again.

    Measured on 2 EPYC cores: the chunk operator's forward+backward at B=1 T=4096 H=4 K=128 V=256 (two 34 MB state
    buffers per call) went from 98-110 to 86-101 ms and from 12-20k page faults per call to ~0; 60 steps of the demo
    preset from 2.7M faults and 88-91 s to 0.4M and 85 s. Freed memory stays with the process for reuse: over 100
    demo steps its resident size held at 1.72 GB, against 1.17-1.67 GB without. Large blocks now share the heap with
    small ones, so a program that keeps small tensors alive between large temporaries can fragment it and grow, as
    glibc's default already does for blocks under 32 MiB. Process-wide, so the `gla` command calls it at start and a
    program importing gla decides for itself (or sets MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_). Returns
    whether it took effect (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def best_time(fn, reps: int = 3) -> float:
    """The shortest of ``reps`` wall-clock timings of fn() in seconds, after one warm-up call: for choices made by
    measuring once in a process (the fastest run is the least disturbed by other tenants of a shared CPU)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@functools.cache
def cpu_bf16_speedup(n: int = 512) -> float:
    """fp32 time / bf16 time of an n^3 matmul on this CPU (``best_time`` of each): how much bf16 autocast would speed
    up a CPU training step's products. Measured once per process (~15 ms where bf16 has matrix units, up to a few
    hundred ms where it is emulated)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    return best_time(lambda: a @ b) / best_time(lambda: a16 @ b16)
