"""Pascal-VOC XML annotations in a plain folder (no ImageSets / JPEGImages layout).

``ann_file`` is the folder of ``.xml`` files; images come from
``data_prefix=dict(img_path=...)`` (default: the same folder). When the XML's
``<filename>`` is not on disk but an image with the XML's stem is (e.g. ``.tif`` named,
``.png`` shipped, as in the NEON tree tiles), that image is used and one warning lists
the substitutions; with neither, loading fails naming both.
"""
import os.path as osp
import warnings
import xml.etree.ElementTree as ET
from typing import List, Optional

from mmdet.datasets import BaseDetDataset
from mmdet.registry import DATASETS
from .annotation_report import AnnotationReport
from .dota import AnnotationError, find_image, image_size, list_annotation_files


@DATASETS.register_module()
class XMLFolderDataset(BaseDetDataset):
    """VOC-style XML boxes from a folder; ``metainfo=dict(classes=...)`` is required.

    Args:
        difficult_as_ignore: mark ``<difficult>1</difficult>`` objects as ignore.
        strict: unknown class names raise (default); False skips them with one warning.
        class_aliases: names used in the XML files mapped onto ``classes``, e.g.
            ``dict(Alive='Tree', Dead='Tree')`` (the NEON SOAP tile labels its trees so).
    """

    def __init__(self, *args, difficult_as_ignore: bool = True, strict: bool = True,
                 class_aliases: Optional[dict] = None, **kwargs):
        self.difficult_as_ignore = difficult_as_ignore
        self.strict = strict
        self.class_aliases = dict(class_aliases or {})
        metainfo = kwargs.get('metainfo') or {}
        if 'classes' not in metainfo:
            raise ValueError('XMLFolderDataset needs its class names: metainfo=dict(classes=(...))')
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        ann_dir = self.ann_file
        files = list_annotation_files('XMLFolderDataset', ann_dir, '.xml')
        img_dir = self.data_prefix.get('img_path') or ann_dir
        self.cat2label = {name: i for i, name in enumerate(self.metainfo['classes'])}
        self.report = AnnotationReport(f'XMLFolderDataset({ann_dir})')
        substituted = []
        data_list = []
        for img_id, name in enumerate(files):
            path = osp.join(ann_dir, name)
            try:
                root = ET.parse(path).getroot()
            except ET.ParseError as error:
                raise AnnotationError(f'{path}: unreadable XML ({error})') from None
            named = (root.findtext('filename') or '').strip()
            img_path = osp.join(img_dir, named)
            if not named or not osp.isfile(img_path):
                img_path = find_image(img_dir, osp.splitext(name)[0])
                if named:
                    substituted.append(f'{named} -> {osp.basename(img_path)}')
            width, height = image_size(img_path)
            data_list.append(dict(img_id=img_id, img_path=img_path, width=width, height=height,
                                  instances=self.parse_objects(root, path)))
        if substituted:
            warnings.warn(f'XMLFolderDataset({ann_dir}): {len(substituted)} XML files name an '
                          f'image that is not on disk; used the image with the XML\'s stem: '
                          f'{", ".join(substituted[:5])}')
        self.report.warn()
        return data_list

    def parse_objects(self, root: ET.Element, path: str) -> List[dict]:
        instances = []
        for index, obj in enumerate(root.findall('object')):
            where = f'{path} (object {index})'
            cls_name = (obj.findtext('name') or '').strip()
            cls_name = self.class_aliases.get(cls_name, cls_name)
            if cls_name not in self.cat2label:
                if self.strict:
                    raise AnnotationError(f'{where}: unknown class {cls_name!r}; known classes are '
                                          f'{list(self.cat2label)}')
                self.report.skip('unknown classes', where)
                continue
            box = obj.find('bndbox')
            try:
                bbox = [float(box.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
            except (AttributeError, TypeError, ValueError):
                raise AnnotationError(f'{where}: missing or non-numeric <bndbox>') from None
            if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
                self.report.skip('empty boxes', where)
                continue
            difficult = parse_flag(obj.findtext('difficult'), f'{where}: <difficult>')
            ignore = bool(difficult) and self.difficult_as_ignore
            if ignore:
                self.report.ignore('difficult objects')
            instances.append(dict(bbox=bbox, bbox_label=self.cat2label[cls_name],
                                  ignore_flag=int(ignore)))
        return instances


def parse_flag(text, where: str) -> int:
    """A VOC flag: an integer, or true / false (as some tools write it); else an error."""
    text = (text or '0').strip()
    if text.lower() in ('true', 'false'):
        return int(text.lower() == 'true')
    try:
        return int(text)
    except ValueError:
        raise AnnotationError(f'{where} must be an integer or true/false, got {text!r}') from None
