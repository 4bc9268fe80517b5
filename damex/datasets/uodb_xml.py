"""mmdet's VOC layout (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``) as UODB uses it.

mmdet's ``XMLDataset`` assumes ``.jpg`` images, truncates coordinates to integers,
subtracts 1 from all of them (VOC's 1-based pixels) and silently drops objects whose
class is not listed. UODB's members differ: LISA, Kitchen and DeepLesion images are
``.png``, and the trees written by ``tools/dataset_converters/uodb.py`` hold 0-based
coordinates as their sources do. This dataset takes the image suffix and the coordinate
convention as arguments, reads coordinates as floats, and makes an unknown class an
error naming the XML file.
"""
import os.path as osp
from typing import List

from mmdet.datasets import XMLDataset
from mmdet.registry import DATASETS
from .dota import AnnotationError


@DATASETS.register_module()
class UODBXMLDataset(XMLDataset):
    """VOC-layout XML dataset with a given image suffix and coordinate convention.

    Args:
        img_suffix: the images' extension, e.g. ``'.png'`` (``JPEGImages/<id><suffix>``).
        one_based: True for VOC's own XML (1-based: 1 is subtracted, as mmdet does),
            False for the converters' trees (0-based: read as stored).
    """

    def __init__(self, *args, img_suffix: str = '.jpg', one_based: bool = True, **kwargs):
        self.img_suffix = img_suffix
        self.one_based = one_based
        super().__init__(*args, **kwargs)

    def parse_data_info(self, img_info: dict) -> dict:
        img_info = dict(img_info, file_name=osp.splitext(img_info['file_name'])[0]
                        + self.img_suffix)
        self._xml_path = img_info['xml_path']
        return super().parse_data_info(img_info)

    def _parse_instance_info(self, raw_ann_info, minus_one: bool = True) -> List[dict]:
        offset = 1.0 if self.one_based else 0.0
        instances = []
        for index, obj in enumerate(raw_ann_info.findall('object')):
            where = f'{self._xml_path} (object {index})'
            name = (obj.findtext('name') or '').strip()
            if name not in self.cat2label:
                raise AnnotationError(f'{where}: unknown class {name!r}; the dataset\'s classes '
                                      f'are {list(self.cat2label)}')
            try:
                box = obj.find('bndbox')
                bbox = [float(box.findtext(k)) - offset for k in ('xmin', 'ymin', 'xmax', 'ymax')]
            except (AttributeError, TypeError, ValueError):
                raise AnnotationError(f'{where}: missing or non-numeric <bndbox>') from None
            difficult = int((obj.findtext('difficult') or '0').strip())
            ignore = bool(difficult)
            if self.bbox_min_size is not None and not self.test_mode:
                ignore |= min(bbox[2] - bbox[0], bbox[3] - bbox[1]) < self.bbox_min_size
            instances.append(dict(bbox=bbox, bbox_label=self.cat2label[name],
                                  ignore_flag=int(ignore)))
        return instances
