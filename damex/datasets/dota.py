"""DOTA (v1.0 / v1.5 / v2.0) in its raw distribution format, as horizontal boxes.

Each ``labelTxt/<stem>.txt`` may start with ``imagesource:`` / ``gsd:`` header lines, then
one object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 class_name difficult``. The quadrilateral
becomes its bounds (shapely ``Polygon.bounds``); its area (shapely) decides degeneracy.
Configured as in mmrotate: ``ann_file`` is the folder of txt files and images come
from ``data_prefix=dict(img_path=...)``.
"""
import os
import os.path as osp
from typing import List

from PIL import Image
from shapely.geometry import Polygon

from mmdet.datasets import BaseDetDataset
from mmdet.registry import DATASETS
from .annotation_report import AnnotationReport

DOTA_V1_0 = ('plane', 'baseball-diamond', 'bridge', 'ground-track-field', 'small-vehicle',
             'large-vehicle', 'ship', 'tennis-court', 'basketball-court', 'storage-tank',
             'soccer-ball-field', 'roundabout', 'harbor', 'swimming-pool', 'helicopter')
DOTA_V1_5 = DOTA_V1_0 + ('container-crane', )
DOTA_V2_0 = DOTA_V1_5 + ('airport', 'helipad')
DOTA_CLASSES = {'1.0': DOTA_V1_0, '1.5': DOTA_V1_5, '2.0': DOTA_V2_0}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


class AnnotationError(ValueError):
    """A malformed annotation; the message names the file (and line)."""


def find_image(folder: str, stem: str) -> str:
    """The image with this stem in ``folder`` (any common extension), or an error."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            path = osp.join(folder, candidate)
            if osp.isfile(path):
                return path
    raise FileNotFoundError(f'no image named {stem}.* ({", ".join(IMAGE_EXTENSIONS)}) '
                            f'in {folder}')


def list_annotation_files(dataset: str, ann_dir: str, extension: str) -> List[str]:
    """Sorted annotation file names in ``ann_dir``; an error naming the folder if none."""
    if not osp.isdir(ann_dir):
        raise FileNotFoundError(f'{dataset}: ann_file must be a folder of {extension} files, '
                                f'{ann_dir} is not a folder')
    files = sorted(f for f in os.listdir(ann_dir) if f.endswith(extension))
    if not files:
        raise FileNotFoundError(f'{dataset}: no {extension} annotation files in {ann_dir}')
    return files


def image_size(path: str):
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:
        raise OSError(f'cannot read image {path}: {error}') from error


def parse_dota_line(line: str, path: str, line_no: int):
    """-> (8 floats, class name, difficult int); raises AnnotationError naming file:line."""
    parts = line.split()
    if len(parts) not in (9, 10):
        raise AnnotationError(f'{path}:{line_no}: expected "x1 y1 ... x4 y4 class [difficult]", '
                              f'got {line.strip()!r}')
    try:
        coords = [float(v) for v in parts[:8]]
        difficult = int(parts[9]) if len(parts) == 10 else 0
    except ValueError:
        raise AnnotationError(f'{path}:{line_no}: non-numeric value in {line.strip()!r}') from None
    return coords, parts[8], difficult


@DATASETS.register_module()
class DOTADataset(BaseDetDataset):
    """DOTA as horizontal-box detection.

    Args:
        version: '1.0' (default), '1.5' or '2.0': the class list, unless ``metainfo``
            gives ``classes``.
        difficult_as_ignore: mark ``difficult`` objects as ignore (default True).
        strict: unknown class names and malformed lines raise (default); with False they
            are skipped and one warning names the file and counts them.
        invalid_polygon: 'warn' skips degenerate (area <= ``min_area``) or
            self-intersecting quadrilaterals with a warning; 'error' raises.
        min_area: polygons with area at or below this are degenerate.
    """

    METAINFO = dict(classes=DOTA_V1_0)

    def __init__(self, *args, version: str = '1.0', difficult_as_ignore: bool = True,
                 strict: bool = True, invalid_polygon: str = 'warn', min_area: float = 1.0,
                 **kwargs):
        if version not in DOTA_CLASSES:
            raise ValueError(f'unknown DOTA version {version!r}; use one of {list(DOTA_CLASSES)}')
        if invalid_polygon not in ('warn', 'error'):
            raise ValueError(f"invalid_polygon must be 'warn' or 'error', got {invalid_polygon!r}")
        self.version = version
        self.difficult_as_ignore = difficult_as_ignore
        self.strict = strict
        self.invalid_polygon = invalid_polygon
        self.min_area = min_area
        metainfo = dict(kwargs.pop('metainfo', None) or {})
        metainfo.setdefault('classes', DOTA_CLASSES[version])
        super().__init__(*args, metainfo=metainfo, **kwargs)

    def load_data_list(self) -> List[dict]:
        ann_dir = self.ann_file
        files = list_annotation_files('DOTADataset', ann_dir, '.txt')
        img_dir = self.data_prefix.get('img_path', '')
        self.cat2label = {name: i for i, name in enumerate(self.metainfo['classes'])}
        self.report = AnnotationReport(f'DOTADataset({ann_dir})')
        data_list = []
        for img_id, name in enumerate(files):
            stem = osp.splitext(name)[0]
            img_path = find_image(img_dir, stem)
            width, height = image_size(img_path)
            instances = self.parse_file(osp.join(ann_dir, name))
            data_list.append(dict(img_id=img_id, img_path=img_path, width=width, height=height,
                                  instances=instances))
        self.report.warn()
        return data_list

    def parse_file(self, path: str) -> List[dict]:
        instances = []
        with open(path, encoding='utf-8-sig') as f:  # a UTF-8 BOM is accepted
            lines = f.readlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip() or line.startswith(('imagesource:', 'gsd:')):
                continue
            where = f'{path}:{line_no}'
            try:
                coords, cls_name, difficult = parse_dota_line(line, path, line_no)
                if cls_name not in self.cat2label:
                    raise AnnotationError(
                        f'{where}: unknown class {cls_name!r}; DOTA v{self.version} classes are '
                        f'{list(self.cat2label)}')
            except AnnotationError:
                if self.strict:
                    raise
                self.report.skip('malformed lines or unknown classes', where)
                continue
            polygon = Polygon(list(zip(coords[0::2], coords[1::2])))
            area = polygon.area if polygon.is_valid else polygon.buffer(0).area
            problem = ('degenerate polygons' if area <= self.min_area else
                       'self-intersecting polygons' if not polygon.is_valid else None)
            if problem:
                if self.invalid_polygon == 'error':
                    raise AnnotationError(f'{where}: {problem[:-1]} {coords}')
                self.report.skip(problem, where)
                continue
            ignore = bool(difficult) and self.difficult_as_ignore
            if ignore:
                self.report.ignore('difficult objects')
            instances.append(dict(bbox=list(polygon.bounds), bbox_label=self.cat2label[cls_name],
                                  ignore_flag=int(ignore), polygon=coords))
        return instances
