import os
import warnings

import pytest

# mmcv warns at import time about optional modules; keep the test output readable.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (minutes); CI runs them too')
    keep_freed_memory_in_tests()


def keep_freed_memory_in_tests():
    """glibc keeps the memory a step frees, in this process and in the tools tests spawn.

    Speed only, no result changes: with glibc's defaults every training step of a test
    page-faults its freed activations back in (see ``damex.cpu_allocator``).
    """
    from damex.cpu_allocator import MALLOC_ENVIRONMENT, keep_freed_memory
    keep_freed_memory()
    for key, value in MALLOC_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


@pytest.fixture
def sample_data():
    """The shared real sample data (DOTA + NEON trees), from $DAMEX_SAMPLE_DATA."""
    path = os.environ.get('DAMEX_SAMPLE_DATA')
    if not path:
        if os.environ.get('CI'):
            pytest.fail('CI must set DAMEX_SAMPLE_DATA (.ci/run does): real-data tests never skip there')
        pytest.skip('set DAMEX_SAMPLE_DATA to the shared sample data folder (CI sets it)')
    if not os.path.isdir(path):
        raise FileNotFoundError(f'DAMEX_SAMPLE_DATA={path} is not a folder')
    return path


@pytest.fixture(scope='session')
def demo_data():
    """The demo mixture under data/demo (written once; deterministic)."""
    from damex.synthetic import make_demo_data
    from damex.testing import REPO
    return make_demo_data(os.path.join(REPO, 'data', 'demo'))


@pytest.fixture(autouse=True, scope='session')
def mmdet_scope():
    """Build transforms and datasets in mmdet's scope, as a Runner with mmdet configs does."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
