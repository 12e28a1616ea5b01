"""The host process under XLA:CPU: glibc's allocator told to keep the memory a step frees.

XLA:CPU allocates each run of a program its buffers afresh: the step's temporaries in one block of
hundreds of MiB (GiB at B7), and every output. glibc serves a block that large with its own mmap and
returns it to the kernel when it is freed, so the next step touches every page anew and the kernel
zeroes each one on a page fault. One core, batch 2, forward + backward of the B0 image tower: 130,000
faults and 0.28 s of kernel time a step out of 0.67 s; at B7 + BERT-Base 842,000 faults, 2.2 s of 6.7 s
(BENCHMARKS.md). PyTorch's eager CPU tensors are smaller and mostly come back from glibc's free lists
(27,000 faults a step at B0).

`keep_freed_memory()` sets three of glibc's `mallopt` parameters, the same effect as starting Python
with MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1:
- M_MMAP_MAX 0: large blocks come from the heap, not from mmaps of their own;
- M_TRIM_THRESHOLD -1: the heap is never trimmed, so freed pages stay mapped for the next step;
- M_ARENA_MAX 1: every thread allocates from the main heap. glibc's per-thread arenas are heaps of at
  most 64 MiB, and a larger request in one of them is mmapped whatever M_MMAP_MAX says; XLA runs its
  programs on threads of its own.
The process then keeps its peak memory for its life, as PyTorch's and JAX's GPU allocators do with
device memory. It must run before JAX starts its CPU client (the first array or device query): a
thread keeps the arena it was given at its first allocation. `bench.py` calls it first thing, and
`train.py` for every model but `tiny` (not for `--memory-report`, which never runs). It does nothing
on other C libraries (macOS, musl), where JAX may find a GPU or TPU (their buffers are device memory,
with an allocator of their own), or with ALIGN_KEEP_FREED_MEMORY=0 in the environment (the tests'
conftest.py sets it).

Costs (BENCHMARKS.md, "Page faults"):
- Compilation: XLA compiles on several threads, which now share one arena's lock. The tiny towers
  compiled in 9.5 s instead of 6.9 s (2 cores). That is why `tiny` (whose blocks glibc's free lists
  already serve: the demo's step is no faster kept) and the tests, mostly compilation, go without.
- Memory: the heap holds the peak, plus fragments. B0 + BERT-Mini above: peak resident memory 1.94 ->
  2.03 GiB. A program that returns a new 256 MiB array per call, freed asynchronously, grew the heap to
  3.5 GiB before glibc reused it (0.7 GiB by default).
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform

# glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _may_have_accelerator():
    """True unless JAX is limited to the CPU or no GPU/TPU plugin is installed (what JAX looks for)."""
    import jax
    platforms = jax.config.jax_platforms  # JAX_PLATFORMS, or set in code
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(name) is not None
               for name in ("jax_plugins", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"))


def keep_freed_memory():
    """Set glibc to keep freed memory mapped (above); returns whether it did."""
    if (os.environ.get("ALIGN_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux"
            or platform.libc_ver()[0] != "glibc" or _may_have_accelerator()):
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
