"""keep_freed_memory: with it, a step that frees and reallocates a large block touches no
fresh pages; without it, glibc hands the block back and every step page-faults."""
import subprocess
import sys

import pytest

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


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, '-c', STEPS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1]) / 10


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
    pages = 40 * 2**20 / 4096
    assert faults_per_step('system') > 0.5 * pages  # glibc's default: fresh pages each step
    assert faults_per_step('keep') < 0.01 * pages

