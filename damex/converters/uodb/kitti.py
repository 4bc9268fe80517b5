"""KITTI object detection (``training/label_2/*.txt``, ``training/image_2/*.png``) -> UODB.

Label lines have 15 fields: ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry``,
boxes in 0-based pixels (devkit). Fates: ``Car`` / ``Pedestrian`` / ``Cyclist`` become
``car`` / ``pedestrian`` / ``cyclist``; with ``occluded`` 3 (unknown) they are ignored
(KITTI's evaluation counts them in no difficulty level); ``Van``, ``Truck``,
``Person_sitting``, ``Tram``, ``Misc`` are dropped (not UODB classes) and ``DontCare``
regions are dropped (regions, not objects: a VOC tree has no class-free ignore region).
"""
import os
import os.path as osp
from typing import Dict, List

from ...datasets.dota import AnnotationError, image_size
from .tree import Box, Fates, Sample, check_box

CLASSES = ('car', 'pedestrian', 'cyclist')
POSITIVE = {'Car': 'car', 'Pedestrian': 'pedestrian', 'Cyclist': 'cyclist'}
DROPPED = {'Van': 'not a UODB class', 'Truck': 'not a UODB class',
           'Person_sitting': 'not a UODB class', 'Tram': 'not a UODB class',
           'Misc': 'not a UODB class', 'DontCare': 'a region to ignore, not an object'}
IMAGE_EXT = '.png'


def read_labels(path: str, sample: Sample, fates: Fates) -> None:
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            where = f'{path}:{number}'
            if len(fields) != 15:
                raise AnnotationError(f'{where}: a KITTI label line has 15 fields, this one '
                                      f'has {len(fields)}: {line.strip()!r}')
            kind = fields[0]
            try:
                occluded = int(fields[2])
                x1, y1, x2, y2 = (float(v) for v in fields[4:8])
            except ValueError:
                raise AnnotationError(f'{where}: non-numeric field in {line.strip()!r}') from None
            if kind in DROPPED:
                fates.dropped(kind, DROPPED[kind])
                continue
            if kind not in POSITIVE:
                raise AnnotationError(f'{where}: unknown KITTI type {kind!r}; known types are '
                                      f'{sorted(POSITIVE) + sorted(DROPPED)}')
            box = Box(POSITIVE[kind], x1, y1, x2, y2, difficult=occluded == 3)
            check_box(box, sample, where)
            if box.difficult:
                fates.ignored(kind, 'occluded=3 (unknown)')
            else:
                fates.positive(kind, box.name)
            sample.boxes.append(box)


def convert(src: str, split_ids: Dict[str, List[str]], fates: Fates) -> Dict[str, List[Sample]]:
    label_dir = osp.join(src, 'training', 'label_2')
    image_dir = osp.join(src, 'training', 'image_2')
    if not osp.isdir(label_dir):
        raise FileNotFoundError(f'{label_dir} is missing: --src must be the folder holding '
                                'KITTI\'s training/label_2 and training/image_2')
    ids = sorted(osp.splitext(n)[0] for n in os.listdir(label_dir) if n.endswith('.txt'))
    if not split_ids:  # documented default: first half of the sorted ids, the rest val
        half = (len(ids) + 1) // 2
        split_ids = dict(train=ids[:half], val=ids[half:])
    samples = {}
    for split, wanted in split_ids.items():
        samples[split] = []
        for sample_id in wanted:
            label = osp.join(label_dir, sample_id + '.txt')
            image = osp.join(image_dir, sample_id + IMAGE_EXT)
            if not osp.isfile(label):
                raise FileNotFoundError(f'split {split}: id {sample_id} has no label {label}')
            if not osp.isfile(image):
                raise FileNotFoundError(f'{label}: its image {image} is missing')
            width, height = image_size(image)
            sample = Sample(sample_id, image, width, height)
            read_labels(label, sample, fates)
            samples[split].append(sample)
    return samples
