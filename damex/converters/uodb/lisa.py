"""LISA traffic signs (``allAnnotations.csv``) -> UODB ``speedlimit, stop, warning, noturn``.

The CSV is ``;``-separated with a header; its 7th field ``Occluded,On another road``
is one field holding two flags joined by a comma (sometimes quoted). Boxes are 0-based
pixels, corners inclusive as stored. Each of LISA's 47 tags becomes one superclass or is
dropped, by the class map ``configs/_base_/class_maps/lisa_to_uodb.json`` (its
``dropped_because`` says why); a tag not in the map is an error. Occluded signs and
signs on another road stay positives (they are still signs of that class).
Split: LISA has none; default: the source videos (``Origin file``) in sorted order, every
5th to ``val`` (UODB's test), the rest to ``train``, so frames of one video never straddle.
"""
import csv
import json
import os.path as osp
from typing import Dict, List

from ...datasets.dota import AnnotationError, image_size
from .tree import Box, Fates, Sample, check_box, select

CLASSES = ('speedlimit', 'stop', 'warning', 'noturn')
IMAGE_EXT = '.png'
CLASS_MAP = osp.join(osp.dirname(__file__), '..', '..', '..', 'configs', '_base_',
                     'class_maps', 'lisa_to_uodb.json')
COLUMNS = ('Filename', 'Annotation tag', 'Upper left corner X', 'Upper left corner Y',
           'Lower right corner X', 'Lower right corner Y', 'Origin file')


def read_class_map(path: str = CLASS_MAP) -> Dict[str, object]:
    with open(path) as f:
        class_map = json.load(f)
    unknown = {c for c in class_map['tags'].values() if c is not None} - set(CLASSES)
    if unknown:
        raise ValueError(f'{path}: tags map to {sorted(unknown)}, not LISA classes {CLASSES}')
    return class_map


def convert(src: str, split_ids: Dict[str, List[str]], fates: Fates,
            class_map_file: str = CLASS_MAP) -> Dict[str, List[Sample]]:
    csv_path = osp.join(src, 'allAnnotations.csv')
    if not osp.isfile(csv_path):
        raise FileNotFoundError(f'{csv_path} is missing: --src must be the LISA folder holding '
                                'allAnnotations.csv and the image folders it names')
    class_map = read_class_map(class_map_file)
    tags, reasons = class_map['tags'], class_map.get('dropped_because', {})
    samples: Dict[str, Sample] = {}
    origin_of: Dict[str, str] = {}
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f, delimiter=';')
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f'{csv_path}:1: the header lacks {missing}')
        for number, row in enumerate(reader, 2):
            where = f'{csv_path}:{number}'
            tag = row['Annotation tag']
            if tag not in tags:
                raise AnnotationError(f'{where}: tag {tag!r} is not in the class map '
                                      f'{osp.normpath(class_map_file)}; add it there')
            relative = row['Filename']
            sample_id = osp.splitext(relative.replace('/', '_'))[0]
            if sample_id not in samples:
                image = osp.join(src, relative)
                if not osp.isfile(image):
                    raise FileNotFoundError(f'{where}: image {image} is missing')
                width, height = image_size(image)
                samples[sample_id] = Sample(sample_id, image, width, height)
                origin_of[sample_id] = row['Origin file']
            if tags[tag] is None:
                fates.dropped(tag, reasons.get(tag, 'not mapped to a UODB class'))
                continue
            try:
                box = Box(tags[tag], *(float(row[c]) for c in COLUMNS[2:6]))
            except (TypeError, ValueError):
                raise AnnotationError(f'{where}: non-numeric corner in {row}') from None
            check_box(box, samples[sample_id], where)
            fates.positive(tag, box.name)
            samples[sample_id].boxes.append(box)
    if split_ids:
        return select(samples, split_ids)
    origins = sorted(set(origin_of.values()))
    held_out = set(origins[4::5])
    return {'train': [s for i, s in samples.items() if origin_of[i] not in held_out],
            'val': [s for i, s in samples.items() if origin_of[i] in held_out]}
