"""QuietOptimWrapperConstructor: mmengine's optimizer, a few summary lines instead of one
line per parameter and setting."""
import logging

import torch
from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from damex.engine import QuietOptimWrapperConstructor

CFG = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4))
PARAMWISE = dict(custom_keys={'backbone': dict(lr_mult=0.1)})


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        self.backbone[1].weight.requires_grad_(False)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def build(constructor):
    logger = MMLogger.get_instance(f'test_optim_{constructor.__name__}', log_level='INFO')
    handler = Lines()
    logger.addHandler(handler)
    try:
        with torch.random.fork_rng():
            wrapper = constructor(CFG, PARAMWISE)(Model())
    finally:
        logger.removeHandler(handler)
    groups = [{k: v for k, v in group.items() if k != 'params'} | dict(
        shapes=[tuple(p.shape) for p in group['params']])
        for group in wrapper.optimizer.param_groups]
    return groups, handler.lines


def test_same_optimizer_and_one_line_per_setting():
    quiet_groups, quiet = build(QuietOptimWrapperConstructor)
    default_groups, default = build(DefaultOptimWrapperConstructor)
    assert quiet_groups == default_groups
    assert sum('paramwise_options --' in line for line in default) == 3 * 3  # 3 params x 3
    assert sum('requires_grad=False' in line for line in default) == 1
    assert not any('paramwise_options --' in line or 'is skipped since' in line
                   for line in quiet)
    summary = [line for line in quiet if line.startswith('paramwise_cfg:')]
    assert summary == [
        'paramwise_cfg: 3 parameters get lr=0.0001, lr_mult=0.1, weight_decay=0.0001: '
        'backbone (3)',
        'paramwise_cfg: 1 frozen parameters (requires_grad=False) are not optimised: '
        'backbone (1)']
