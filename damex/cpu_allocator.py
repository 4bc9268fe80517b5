"""A steady-state CPU allocator for benchmarks: glibc keeps the memory a step frees.

By default glibc serves large blocks with fresh ``mmap``s and hands the top of its heap
back to the OS once enough of it is free, so a training step that frees and reallocates
tens of MB touches fresh pages every step: one page fault per 4 KiB. Measured here (2-core
AMD EPYC, bf16, fwd + bwd): ~10k faults per MoE FFN step at 2 x 1024 tokens, a third of
its time, and ~50k per dense FFN step at 2 x 4096. Those faults are not the layers' cost:
a caching allocator (PyTorch's on CUDA, jemalloc, tcmalloc) keeps freed memory, and so
does glibc with its trim and mmap thresholds raised, which :func:`keep_freed_memory` does.
It changes this process only; training on a CPU gets the same with the environment
variables ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_``, or jemalloc.
"""
import ctypes
import resource

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30

#: the same for processes started with this environment (glibc reads it at start)
MALLOC_ENVIRONMENT = {'MALLOC_TRIM_THRESHOLD_': str(_LIMIT), 'MALLOC_MMAP_THRESHOLD_': str(_LIMIT)}


def keep_freed_memory(limit: int = _LIMIT) -> bool:
    """Raise glibc's trim and mmap thresholds to ``limit`` bytes for this process.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, limit)) and bool(mallopt(_M_MMAP_THRESHOLD, limit))


def benchmark_allocator(device: str, system_allocator: bool) -> str:
    """What the benchmarks time with, for their header: on a CPU glibc keeps freed memory
    unless ``system_allocator`` (their ``--system-allocator`` flag) asks for its defaults."""
    if device == 'cpu' and not system_allocator and keep_freed_memory():
        return 'glibc keeps freed memory'
    return 'system'


def minor_page_faults() -> int:
    """Minor page faults of this process so far (fresh pages touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
