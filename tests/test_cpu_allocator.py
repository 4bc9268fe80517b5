"""keep_freed_memory: with it, a step that frees and reallocates a large block touches no
fresh pages; without it, glibc hands the block back and every step page-faults."""
import os
import subprocess
import sys

import pytest

from damex import cpu_allocator
from damex.cpu_allocator import MALLOC_ENVIRONMENT

# the child loads cpu_allocator.py alone (no torch, no damex package: it starts in ~0.1 s)
STEPS = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location('cpu_allocator', sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if sys.argv[1] == 'keep':
    assert allocator.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():  # 40 MB, written, freed
    block = libc.malloc(40 * 2**20)
    ctypes.memset(block, 1, 40 * 2**20)
    libc.free(block)
for _ in range(3):
    step()
before = allocator.minor_page_faults()
for _ in range(10):
    step()
print(allocator.minor_page_faults() - before)
"""


def faults_per_step(mode: str, env=None) -> float:
    out = subprocess.run([sys.executable, '-c', STEPS, mode, cpu_allocator.__file__],
                         capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1]) / 10


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
    pages = 40 * 2**20 / 4096
    system = {k: v for k, v in os.environ.items() if k not in MALLOC_ENVIRONMENT}
    assert faults_per_step('system', system) > 0.5 * pages  # glibc's default: fresh pages
    assert faults_per_step('keep', system) < 0.01 * pages
    # what the test suite hands the tools it starts
    assert faults_per_step('system', {**system, **MALLOC_ENVIRONMENT}) < 0.01 * pages

