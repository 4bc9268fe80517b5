"""Test with mmdet's own tools/test.py (same flags), damex imported first.

    python tools/test.py configs/demo/damex_demo.py CHECKPOINT [--work-dir DIR] ...

``mim test mmdet CONFIG --checkpoint CKPT`` runs the same script; configs import damex themselves
through ``custom_imports``, so both work.
"""
import os.path as osp
import runpy

import mmdet

import damex  # noqa: F401  (registers damex's modules before the config is built)
from damex.compat import silence_known_warnings

if __name__ == '__main__':
    silence_known_warnings()
    runpy.run_path(osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'test.py'),
                   run_name='__main__')
