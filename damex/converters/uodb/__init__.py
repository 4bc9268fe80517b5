"""UODB's members from their owners' formats into the VOC layout the UODB config reads.

``convert(dataset, src, out, split_files)`` reads ``src`` as distributed, writes ``out``
(see :mod:`.tree` for the layout and the 0-based coordinate rule) and returns the fate
counts; ``tools/dataset_converters/uodb.py`` is its command line.
"""
from typing import Dict, Optional

from . import deeplesion, kitchen, kitti, lisa, widerface
from .tree import Fates, write_tree

CONVERTERS = dict(kitti=kitti, widerface=widerface, lisa=lisa, deeplesion=deeplesion,
                  kitchen=kitchen)


def read_ids(path: str) -> list:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def convert(dataset: str, src: str, out: str, split_files: Optional[Dict[str, str]] = None,
            workers: int = 4, **options) -> Fates:
    if dataset not in CONVERTERS:
        raise ValueError(f'unknown dataset {dataset!r}; converters: {", ".join(CONVERTERS)}')
    module = CONVERTERS[dataset]
    fates = Fates()
    split_ids = {name: read_ids(path) for name, path in (split_files or {}).items()}
    splits = module.convert(src, split_ids, fates, **options)
    write_tree(splits, out, module.IMAGE_EXT, workers)
    return fates


__all__ = ['CONVERTERS', 'Fates', 'convert']
