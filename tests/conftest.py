import os
import warnings

import pytest

# mmcv warns at import time about optional modules; keep the test output readable.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (minutes); CI runs them too')


@pytest.fixture
def sample_data():
    """The shared real sample data (DOTA + NEON trees), from $DAMEX_SAMPLE_DATA."""
    path = os.environ.get('DAMEX_SAMPLE_DATA')
    if not path:
        pytest.skip('set DAMEX_SAMPLE_DATA to the shared sample data folder (CI sets it)')
    if not os.path.isdir(path):
        raise FileNotFoundError(f'DAMEX_SAMPLE_DATA={path} is not a folder')
    return path
