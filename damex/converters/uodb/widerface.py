"""WIDER FACE (``wider_face_split/wider_face_{train,val}_bbx_gt.txt``) -> UODB ``face``.

Per image: a path line, a count line, then one line per face ``x1 y1 w h blur expression
illumination invalid occlusion pose`` (0-based pixels); an image without faces has count
0 and one placeholder line of zeros. Fates: a face is ``face``; ``invalid`` 1 is ignored
(WIDER's own evaluation ignores them); a box with w or h = 0 is dropped (no area). The
image without faces is kept as a negative. Splits: WIDER's own train and val.
"""
import os.path as osp
from typing import Dict, List

from ...datasets.dota import AnnotationError, image_size
from .tree import Box, Fates, Sample, check_box

CLASSES = ('face', )
IMAGE_EXT = '.jpg'
SPLITS = ('train', 'val')


def _sample_id(relative: str) -> str:
    return osp.splitext(relative.replace('/', '_'))[0]


def read_split(src: str, split: str, fates: Fates) -> List[Sample]:
    gt = osp.join(src, 'wider_face_split', f'wider_face_{split}_bbx_gt.txt')
    if not osp.isfile(gt):
        raise FileNotFoundError(f'{gt} is missing: --src must be the folder holding '
                                'wider_face_split/ and WIDER_train/, WIDER_val/')
    with open(gt) as f:
        lines = [line.rstrip('\n') for line in f]
    samples, i = [], 0
    while i < len(lines):
        relative = lines[i].strip()
        if not relative:
            i += 1
            continue
        try:
            count = int(lines[i + 1])
        except (IndexError, ValueError):
            raise AnnotationError(f'{gt}:{i + 2}: expected the face count of {relative}') from None
        image = osp.join(src, f'WIDER_{split}', 'images', relative)
        if not osp.isfile(image):
            raise FileNotFoundError(f'{gt}:{i + 1}: image {image} is missing')
        width, height = image_size(image)
        sample = Sample(_sample_id(relative), image, width, height)
        for number in range(i + 3, i + 3 + max(count, 1)):
            where = f'{gt}:{number}'
            try:
                values = [int(v) for v in lines[number - 1].split()]
            except (IndexError, ValueError):
                raise AnnotationError(f'{where}: expected a face line of 10 integers') from None
            if len(values) != 10:
                raise AnnotationError(f'{where}: a face line has 10 fields, this one has '
                                      f'{len(values)}')
            if count == 0:  # the placeholder of an image without faces
                continue
            x, y, w, h, invalid = values[0], values[1], values[2], values[3], values[7]
            if w <= 0 or h <= 0:
                fates.dropped('face', 'zero width or height')
                continue
            box = Box('face', x, y, x + w, y + h, difficult=bool(invalid))
            check_box(box, sample, where)
            if invalid:
                fates.ignored('face', 'invalid=1')
            else:
                fates.positive('face', 'face')
            sample.boxes.append(box)
        samples.append(sample)
        i += 2 + max(count, 1)
    return samples


def convert(src: str, split_ids: Dict[str, List[str]], fates: Fates) -> Dict[str, List[Sample]]:
    if split_ids:
        raise ValueError('WIDER FACE has its own train / val split; --split is not used')
    return {split: read_split(src, split, fates) for split in SPLITS}
