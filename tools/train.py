"""Train with mmdet's own tools/train.py (same flags), damex imported first.

    python tools/train.py configs/demo/damex_demo.py [--resume] [--work-dir DIR] ...

``mim train mmdet CONFIG`` runs the same script; configs import damex themselves
through ``custom_imports``, so both work.
"""
import os.path as osp
import runpy

import mmdet

import damex  # noqa: F401  (registers damex's modules before the config is built)

if __name__ == '__main__':
    runpy.run_path(osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py'),
                   run_name='__main__')
