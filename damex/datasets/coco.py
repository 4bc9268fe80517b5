"""COCO JSON datasets whose categories are mapped by name, in ``metainfo.classes`` order.

mmdet's ``CocoDataset`` labels categories in the JSON's order among the named ones, drops
unknown names silently and falls back to COCO's 80 classes without ``metainfo``; the
per-dataset metric maps labels back by name. :class:`NamedCocoDataset` makes loading and
evaluation agree: label i is ``classes[i]``, found by name in the JSON, and everything that
could make the two disagree is an error naming the file. A :class:`DatasetMixture` uses it
for every dataset configured as ``type='CocoDataset'``.
"""
import contextlib
import io
import json
from functools import partial
from typing import Dict, List, Optional, Sequence

from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmdet.registry import DATASETS
from .annotation_report import AnnotationReport

REQUIRED_KEYS = ('images', 'annotations', 'categories')


def read_coco_json(path: str) -> dict:
    """Parse a COCO JSON file (a UTF-8 BOM is accepted); errors name the file and the key."""
    with open(path, 'rb') as f:
        raw = f.read()
    text = raw.decode('utf-8-sig', errors='strict') if raw else ''
    if not text.strip():
        raise ValueError(f'{path}: the COCO annotation file is empty')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a COCO annotation file must hold a JSON object, '
                         f'got {type(data).__name__}')
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f'{path}: the COCO annotation file has no {", ".join(map(repr, missing))} '
                         f'key (it needs {", ".join(REQUIRED_KEYS)})')
    id_of_file: Dict[str, object] = {}
    for image in data['images']:
        name = image.get('file_name')
        if name in id_of_file:
            raise ValueError(
                f'{path}: image {name!r} is listed under two image ids, {id_of_file[name]!r} '
                f'and {image.get("id")!r}: its ground truth would be split between two '
                'samples, each a negative for the other\'s boxes; merge them into one image '
                'entry (and point the annotations at its id)')
        id_of_file[name] = image.get('id')
    for ann in data['annotations']:
        for key in ('image_id', 'category_id', 'bbox', 'area'):
            if key not in ann:
                raise ValueError(f'{path}: annotation {ann.get("id", "?")} has no {key!r}')
    return data


def category_ids_by_name(path: str, categories: List[dict], annotations: List[dict],
                         classes: Sequence[str], ignore_classes: Sequence[str] = ()) -> List[int]:
    """The JSON category id of every class, in ``classes`` order.

    Errors (naming the file and the names): a class missing from the JSON, a category name
    that occurs twice, and a JSON category with annotations that is neither a class nor in
    ``ignore_classes``.
    """
    by_name: Dict[str, List[int]] = {}
    for cat in categories:
        by_name.setdefault(cat['name'], []).append(cat['id'])
    duplicated = sorted(name for name, ids in by_name.items() if len(ids) > 1)
    if duplicated:
        raise ValueError(f'{path}: category names {duplicated} occur more than once; merge them '
                         'in the JSON (two ids for one name cannot both be one class)')
    missing = [name for name in classes if name not in by_name]
    if missing:
        raise ValueError(f'{path}: classes {missing} are not categories of the JSON, which has '
                         f'{sorted(by_name)} (names must match exactly, case included)')
    unknown_ignored = [name for name in ignore_classes if name not in by_name]
    if unknown_ignored:
        raise ValueError(f'{path}: ignore_classes {unknown_ignored} are not categories of the '
                         f'JSON, which has {sorted(by_name)}')
    used = {ann['category_id'] for ann in annotations}
    unlisted = sorted(name for name, (cat_id, ) in by_name.items()
                      if cat_id in used and name not in classes and name not in ignore_classes)
    if unlisted:
        raise ValueError(f'{path}: categories {unlisted} have annotations but are not in '
                         'metainfo.classes; add them to the classes, or list them in '
                         'ignore_classes=(...) to drop their boxes on purpose')
    return [by_name[name][0] for name in classes]


class _NamedCOCO(COCO):
    """mmdet's COCO API on a checked JSON, whose ``get_cat_ids`` answers in classes order."""

    def __init__(self, annotation_file: str, classes: Sequence[str],
                 ignore_classes: Sequence[str], source: Optional[str] = None):
        super().__init__(None)
        source = source or annotation_file
        self.dataset = read_coco_json(annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.createIndex()
        self.img_ann_map, self.cat_img_map = self.imgToAnns, self.catToImgs
        self._class_cat_ids = category_ids_by_name(
            source, self.dataset['categories'], self.dataset['annotations'], classes,
            ignore_classes)

    def get_cat_ids(self, cat_names=(), sup_names=(), cat_ids=()):
        return list(self._class_cat_ids)


def box_problem(ann: dict, image: dict) -> Optional[str]:
    """Why mmdet's loader would drop this box (it does so silently), or None."""
    x1, y1, w, h = ann['bbox']
    if w <= 0 or h <= 0 or ann['area'] <= 0:
        return 'boxes of zero or negative size'
    inter_w = max(0, min(x1 + w, image['width']) - max(x1, 0))
    inter_h = max(0, min(y1 + h, image['height']) - max(y1, 0))
    if inter_w * inter_h == 0:
        return 'boxes wholly outside the image'
    if w < 1 or h < 1:
        return 'boxes narrower than 1 pixel'
    return None


@DATASETS.register_module()
class NamedCocoDataset(CocoDataset):
    """``CocoDataset`` whose label i is ``metainfo.classes[i]``, matched by name in the JSON.

    Args:
        ignore_classes: JSON categories whose annotations are dropped on purpose (without
            it, a category with annotations that is not in ``classes`` is an error).
        Others as ``CocoDataset``; ``metainfo=dict(classes=...)`` is required.

    Boxes that mmdet's loader drops (zero or negative size, wholly outside the image,
    narrower than a pixel) are still dropped, with one counted warning per file.
    """

    def __init__(self, *args, ignore_classes: Sequence[str] = (), **kwargs):
        metainfo = kwargs.get('metainfo') or {}
        if 'classes' not in metainfo:
            raise ValueError(
                f'COCO dataset {kwargs.get("ann_file", "")!r}: set metainfo=dict(classes=(...)) '
                'to the class names it trains on (without it mmdet silently uses COCO\'s 80 '
                'classes)')
        self.ignore_classes = tuple(ignore_classes)
        super().__init__(*args, **kwargs)

    @property
    def COCOAPI(self):  # noqa: N802 (mmdet's name)
        """mmdet's loader builds ``self.COCOAPI(local_path)``: the checked, by-name API."""
        return partial(_NamedCOCO, classes=self.metainfo['classes'],
                       ignore_classes=self.ignore_classes, source=self.ann_file)

    def load_data_list(self) -> List[dict]:
        self._report = AnnotationReport(str(self.ann_file))
        data_list = super().load_data_list()
        self._report.warn()
        return data_list

    def filter_data(self) -> List[dict]:
        kept = super().filter_data()
        if not kept:
            raise ValueError(f'{self.ann_file}: no image left after filtering (filter_cfg='
                             f'{self.filter_cfg}; filter_empty_gt=True drops every image '
                             'without boxes of the listed classes)')
        return kept

    def parse_data_info(self, raw_data_info: dict):
        image = raw_data_info['raw_img_info']
        for ann in raw_data_info['raw_ann_info']:
            if ann.get('ignore', False) or ann['category_id'] not in self.cat_ids:
                continue
            reason = box_problem(ann, image)
            if reason:
                self._report.skip(reason, f'image {image["id"]}, annotation {ann.get("id")}')
        return super().parse_data_info(raw_data_info)
