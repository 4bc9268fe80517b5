"""Train with mmdet's own tools/train.py (same flags), damex imported first.

    python tools/train.py configs/demo/damex_demo.py [--resume] [--work-dir DIR] ...

``mim train mmdet CONFIG`` runs the same script; configs import damex themselves
through ``custom_imports``, so both work.
"""
import os
import os.path as osp
import runpy
import sys

import mmdet
import torch

import damex  # noqa: F401  (registers damex's modules before the config is built)
from damex.compat import silence_known_warnings


def init_cpu_process_group() -> None:
    """``--launcher pytorch`` without CUDA: start a gloo process group ourselves.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and so cannot start a CPU
    run; with the group already initialised, it skips its own initialisation.
    """
    if ('--launcher' in sys.argv and 'pytorch' in sys.argv and not torch.cuda.is_available()
            and 'RANK' in os.environ and not torch.distributed.is_initialized()):
        torch.distributed.init_process_group(backend='gloo')


if __name__ == '__main__':
    silence_known_warnings()
    init_cpu_process_group()
    runpy.run_path(osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py'),
                   run_name='__main__')
