"""keep_freed_memory: with it, a step that frees and reallocates a large block touches no
fresh pages; without it, glibc hands the block back and every step page-faults."""
import os
import subprocess
import sys

import pytest

from damex.cpu_allocator import MALLOC_ENVIRONMENT

STEPS = """
import sys, torch
from damex.cpu_allocator import keep_freed_memory, minor_page_faults
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
for _ in range(3):
    torch.ones(10 * 2**20)  # 40 MB, written, freed
before = minor_page_faults()
for _ in range(10):
    torch.ones(10 * 2**20)
print(minor_page_faults() - before)
"""


def faults_per_step(mode: str, env=None) -> float:
    out = subprocess.run([sys.executable, '-c', STEPS, mode], capture_output=True, text=True,
                         check=True, env=env)
    return int(out.stdout.split()[-1]) / 10


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
    pages = 40 * 2**20 / 4096
    system = {k: v for k, v in os.environ.items() if k not in MALLOC_ENVIRONMENT}
    assert faults_per_step('system', system) > 0.5 * pages  # glibc's default: fresh pages
    assert faults_per_step('keep', system) < 0.01 * pages
    # what the test suite hands the tools it starts
    assert faults_per_step('system', {**system, **MALLOC_ENVIRONMENT}) < 0.01 * pages

