"""GMU Kitchen Scenes (``gmu_scene_00N/Images/rgb_*.png``, ``Annotations/rgb_*.xml``) -> UODB.

The frames' VOC-style XML boxes are 1-based (UODB's loader subtracts 1): 1 is subtracted.
Ids are ``<scene folder>_<frame stem>``, as UODB names them. Classes: the 11 BigBIRD
instances of the dataset; another name is an error naming the file. Split: no public
record of UODB's exists; default: scenes 1-6 ``train``, scenes 7-9 ``val`` (UODB's
test), so frames of one scene never straddle.
"""
import os
import os.path as osp
import re
import xml.etree.ElementTree as ET
from typing import Dict, List

from ...datasets.dota import AnnotationError, image_size
from .tree import Box, Fates, Sample, check_box, select

CLASSES = ('coca_cola_glass_bottle', 'coffee_mate_french_vanilla',
           'honey_bunches_of_oats_honey_roasted', 'hunts_sauce', 'mahatma_rice',
           'nature_valley_soft_baked_oatmeal_squares_cinnamon_brown_sugar',
           'nature_valley_sweet_and_salty_nut_almond', 'palmolive_orange',
           'pop_secret_light_butter', 'pringles_bbq', 'red_bull')
IMAGE_EXT = '.png'
VAL_SCENES = (7, 8, 9)


def read_frame(xml_path: str, sample: Sample, fates: Fates) -> None:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise AnnotationError(f'{xml_path}: unreadable XML ({error})') from None
    for index, obj in enumerate(root.findall('object')):
        where = f'{xml_path} (object {index})'
        name = (obj.findtext('name') or '').strip()
        if name not in CLASSES:
            raise AnnotationError(f'{where}: unknown instance {name!r}; GMU Kitchen has '
                                  f'{list(CLASSES)}')
        try:
            x1, y1, x2, y2 = (float(obj.find('bndbox').findtext(k)) - 1
                              for k in ('xmin', 'ymin', 'xmax', 'ymax'))
        except (AttributeError, TypeError, ValueError):
            raise AnnotationError(f'{where}: missing or non-numeric <bndbox>') from None
        box = Box(name, x1, y1, x2, y2)
        check_box(box, sample, where)
        fates.positive(name, name)
        sample.boxes.append(box)


def convert(src: str, split_ids: Dict[str, List[str]], fates: Fates) -> Dict[str, List[Sample]]:
    scenes = sorted(n for n in os.listdir(src) if re.fullmatch(r'gmu_scene_\d+', n))
    if not scenes:
        raise FileNotFoundError(f'no gmu_scene_* folder in {src}: --src must be the folder '
                                'holding the unpacked GMU Kitchen scenes')
    samples: Dict[str, Sample] = {}
    scene_of: Dict[str, int] = {}
    for scene in scenes:
        ann_dir, img_dir = osp.join(src, scene, 'Annotations'), osp.join(src, scene, 'Images')
        for name in sorted(os.listdir(ann_dir)):
            if not name.endswith('.xml'):
                continue
            stem = osp.splitext(name)[0]
            image = osp.join(img_dir, stem + IMAGE_EXT)
            if not osp.isfile(image):
                raise FileNotFoundError(f'{osp.join(ann_dir, name)}: its image {image} is missing')
            width, height = image_size(image)
            sample = Sample(f'{scene}_{stem}', image, width, height)
            read_frame(osp.join(ann_dir, name), sample, fates)
            samples[sample.id] = sample
            scene_of[sample.id] = int(scene.rsplit('_', 1)[1])
    if split_ids:
        return select(samples, split_ids)
    return {'train': [s for i, s in samples.items() if scene_of[i] not in VAL_SCENES],
            'val': [s for i, s in samples.items() if scene_of[i] in VAL_SCENES]}
