"""Helpers for damex's tests (as ``mmdet.testing`` for mmdet's): the repository, the demo
config shrunk to seconds, and importing a script under tools/ as a module."""
import importlib.util
import os

from .synthetic.demo_data import ROOT as REPO

__all__ = ['REPO', 'load_tool', 'tiny_demo_config']


def load_tool(relative_path: str):
    """Import a script under tools/ (a path relative to the repository) as a module."""
    path = os.path.join(REPO, relative_path)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
