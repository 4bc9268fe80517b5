"""DeepLesion (``DL_info.csv``, ``Images_png/``) -> UODB ``lesion``, rendered to 8 bits.

``DL_info.csv`` has one row per lesion (an image with two lesions has two rows);
``File_name`` ``000089_01_01_037.png`` is ``Images_png/000089_01_01/037.png``, a 16-bit
PNG with HU = value - 32768. ``Bounding_boxes`` ``x1, y1, x2, y2`` are 1-based: 1 is
subtracted. ``Train_Val_Test`` 1 / 2 / 3: UODB trains on train + val and tests on test,
written as the config's ``train`` / ``val``.

Rendering (UODB does not document its own): the window [lo, hi] HU (default
[-1024, 3071], as 3DCE and MULAN) mapped linearly to 0..255, ``round(255 * (clip(HU, lo,
hi) - lo) / (hi - lo))``; RGB = the slices before, at and after the key slice (3DCE's
3-slice input; a missing neighbour repeats the key slice), or the key slice three times
with ``single_slice``.
"""
import csv
import functools
import os.path as osp
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from ...datasets.dota import AnnotationError
from .tree import Box, Fates, Sample, check_box

CLASSES = ('lesion', )
IMAGE_EXT = '.png'
DEFAULT_WINDOW = (-1024, 3071)
HU_OFFSET = 32768
SPLIT_OF = {'1': 'train', '2': 'train', '3': 'val'}


def window_to_uint8(values: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """16-bit DeepLesion pixel values -> 8 bits through the HU window."""
    lo, hi = window
    hu = values.astype(np.float64) - HU_OFFSET
    return np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def slice_path(src: str, file_name: str, offset: int = 0) -> str:
    stem, ext = osp.splitext(file_name)
    series, index = stem.rsplit('_', 1)
    return osp.join(src, 'Images_png', series, f'{int(index) + offset:03d}{ext}')


def read_slice(path: str) -> np.ndarray:
    with Image.open(path) as image:
        values = np.asarray(image)
    if values.ndim != 2:
        raise ValueError(f'{path}: expected a 16-bit single-channel CT slice, got shape '
                         f'{values.shape}')
    return values


def render(target: str, src: str, file_name: str, window: Sequence[float],
           single_slice: bool) -> None:
    key = slice_path(src, file_name)
    channels = []
    for offset in ((0, 0, 0) if single_slice else (-1, 0, 1)):
        path = slice_path(src, file_name, offset)
        channels.append(read_slice(path if osp.isfile(path) else key))
    Image.fromarray(np.stack([window_to_uint8(c, window) for c in channels], -1)).save(target)


def convert(src: str, split_ids: Dict[str, List[str]], fates: Fates,
            window: Sequence[float] = DEFAULT_WINDOW,
            single_slice: bool = False) -> Dict[str, List[Sample]]:
    if split_ids:
        raise ValueError('DeepLesion has its own split (Train_Val_Test); --split is not used')
    csv_path = osp.join(src, 'DL_info.csv')
    if not osp.isfile(csv_path):
        raise FileNotFoundError(f'{csv_path} is missing: --src must be the DeepLesion folder '
                                'holding DL_info.csv and Images_png/')
    samples: Dict[str, Sample] = {}
    split_of: Dict[str, str] = {}
    with open(csv_path, newline='') as f:
        for number, row in enumerate(csv.DictReader(f), 2):
            where = f'{csv_path}:{number}'
            try:
                name, split = row['File_name'], SPLIT_OF[row['Train_Val_Test'].strip()]
                x1, y1, x2, y2 = (float(v) - 1 for v in row['Bounding_boxes'].split(','))
                width, height = (int(float(v)) for v in row['Image_size'].split(','))
            except (KeyError, ValueError, TypeError) as error:
                raise AnnotationError(f'{where}: malformed row ({type(error).__name__}: '
                                      f'{error})') from None
            sample_id = osp.splitext(name)[0]
            if sample_id not in samples:
                key = slice_path(src, name)
                if not osp.isfile(key):
                    raise FileNotFoundError(f'{where}: key slice {key} is missing')
                samples[sample_id] = Sample(
                    sample_id, key, width, height,
                    render=functools.partial(render, src=src, file_name=name,
                                             window=tuple(window), single_slice=single_slice))
                split_of[sample_id] = split
            elif split_of[sample_id] != split:
                raise AnnotationError(f'{where}: {name} is in split {split}, an earlier row put '
                                      f'it in {split_of[sample_id]}')
            box = Box('lesion', x1, y1, x2, y2)
            check_box(box, samples[sample_id], where)
            fates.positive('lesion', 'lesion')
            samples[sample_id].boxes.append(box)
    return {split: [s for i, s in samples.items() if split_of[i] == split]
            for split in ('train', 'val')}
