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
        if os.environ.get('CI'):
            pytest.fail('CI must set DAMEX_SAMPLE_DATA (.ci/run does): real-data tests never skip there')
        pytest.skip('set DAMEX_SAMPLE_DATA to the shared sample data folder (CI sets it)')
    if not os.path.isdir(path):
        raise FileNotFoundError(f'DAMEX_SAMPLE_DATA={path} is not a folder')
    return path


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(relative_path: str):
    """Import a script under tools/ as a module."""
    import importlib.util
    path = os.path.join(REPO, relative_path)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def demo_data():
    """The demo mixture under data/demo (written once; deterministic)."""
    return load_tool('tools/misc/make_demo_data.py').make_demo_data(
        os.path.join(REPO, 'data', 'demo'))


def tiny_demo_config(work_dir, config='configs/demo/damex_demo.py', max_iters=2, **moe):
    """The demo config shrunk for tests: 2 iterations, checkpoint at the end, no eval."""
    from mmengine.config import Config
    cfg = Config.fromfile(os.path.join(REPO, config))
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 10 ** 6
    cfg.train_cfg.val_begin = max_iters + 1  # the loop would also validate after the last iter
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = 1
    cfg.model.encoder.num_layers = 1
    cfg.model.num_queries = 20
    cfg.model.dn_cfg.group_cfg.num_dn_queries = 10
    if moe and cfg.model.get('moe') is not None:
        cfg.model.moe.update(moe)
    cfg.randomness = dict(seed=0)
    return cfg


@pytest.fixture(autouse=True, scope='session')
def mmdet_scope():
    """Build transforms and datasets in mmdet's scope, as a Runner with mmdet configs does."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
