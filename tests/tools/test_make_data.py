"""The synthetic-data CLIs write exactly what the importable writers write."""
import filecmp
import os
import subprocess
import sys

import pytest

from damex.synthetic import make_demo_data, make_heldout_data
from damex.testing import REPO

pytestmark = pytest.mark.slow  # spawns processes


def same_tree(a, b):
    comparison = filecmp.dircmp(a, b)
    assert not (comparison.left_only or comparison.right_only or comparison.diff_files), (
        comparison.left_only, comparison.right_only, comparison.diff_files)
    for sub in comparison.common_dirs:
        same_tree(os.path.join(a, sub), os.path.join(b, sub))


@pytest.mark.parametrize('tool, writer', [('make_demo_data.py', make_demo_data),
                                          ('make_heldout_data.py', make_heldout_data)])
def test_cli_writes_what_the_module_writes(tmp_path, tool, writer):
    out = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'misc', tool), '--out',
                          str(tmp_path / 'cli')], capture_output=True, text=True, check=True)
    assert str(tmp_path / 'cli') in out.stdout
    writer(str(tmp_path / 'module'))
    same_tree(str(tmp_path / 'cli'), str(tmp_path / 'module'))
    assert os.path.exists(tmp_path / 'cli' / '.complete')
