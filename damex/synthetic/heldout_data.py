"""Write the held-out benchmark mixture under data/heldout/: five datasets, three domains,
disjoint training and validation images.

- trees   (VOC XML, real): the NEON tiles of assets/neon_trees; 160x160 crops of the top
  half of each tile for training, of the bottom half for validation (no pixel in both).
- aerial  (DOTA txt, rendered): planes and storage tanks on textured ground.
- harbor  (DOTA txt, rendered): ships on water, the aerial domain, its own label space.
- signs   (COCO JSON, rendered): stop and yield signs on a street.
- lights  (COCO JSON, rendered): traffic lights on a street, the street domain, its own
  label space.
Rendered datasets draw training and validation scenes from different seeds. Deterministic.
"""
import json
import math
import os
import os.path as osp
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

from .demo_data import neon_trees_folder, rotated, textured, write_once, write_voc

#: images and seed offset per split: 24 validation images per rendered dataset, so that one
#: image does not decide an AP (training data as before)
SPLITS = dict(train=(12, 100), val=(24, 200))


def write_trees(out: str) -> None:
    src = neon_trees_folder()
    for split, rows in (('train', (0, 40)), ('val', (200, 240))):
        os.makedirs(osp.join(out, split), exist_ok=True)
        for stem in ('OSBS_029', 'SOAP_061'):
            image = Image.open(osp.join(src, stem + '.png')).convert('RGB')
            boxes = [[float(o.find('bndbox').findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
                     for o in ET.parse(osp.join(src, stem + '.xml')).getroot().iter('object')]
            for y0 in rows:
                for x0 in (0, 80, 160, 240):
                    kept = []
                    for x1, y1, x2, y2 in boxes:
                        cx1, cy1, cx2, cy2 = max(x1, x0), max(y1, y0), min(x2, x0 + 160), \
                            min(y2, y0 + 160)
                        if cx2 > cx1 and cy2 > cy1 and \
                                (cx2 - cx1) * (cy2 - cy1) >= 0.5 * (x2 - x1) * (y2 - y1):
                            kept.append((cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
                    name = f'{stem}_{y0:03d}_{x0:03d}'
                    image.crop((x0, y0, x0 + 160, y0 + 160)).save(
                        osp.join(out, split, name + '.png'))
                    write_voc(osp.join(out, split, name + '.xml'), name + '.png', kept)
                    tree = ET.parse(osp.join(out, split, name + '.xml'))
                    size = tree.getroot().find('size')
                    size.find('width').text = size.find('height').text = '160'
                    tree.write(osp.join(out, split, name + '.xml'))


def write_dota(out, seed, split, num, size, background, objects):
    """Rendered aerial scenes; ``objects(rng, draw, cx, cy)`` -> (quad, class)."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(out, split, 'images'), exist_ok=True)
    os.makedirs(osp.join(out, split, 'labelTxt'), exist_ok=True)
    for index in range(num):
        image = textured(rng, size, *background)
        draw = ImageDraw.Draw(image)
        lines = ['imagesource:rendered', 'gsd:1.0']
        for _ in range(rng.integers(2, 5)):
            cx, cy = rng.uniform(40, size - 40, 2)
            quad, cls = objects(rng, draw, cx, cy)
            coords = ' '.join(f'{min(max(v, 0), size - 1):.1f}' for p in quad for v in p)
            lines.append(f'{coords} {cls} 0')
        image.save(osp.join(out, split, 'images', f'I{index:04d}.png'))
        with open(osp.join(out, split, 'labelTxt', f'I{index:04d}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def plane_or_tank(rng, draw, cx, cy):
    if rng.random() < 0.5:
        half, angle = rng.uniform(18, 30), rng.uniform(0, math.pi)
        for shape in ([(-half, -4), (half, -4), (half, 4), (-half, 4)],
                      [(-4, -half * 0.8), (4, -half * 0.8), (4, half * 0.8), (-4, half * 0.8)]):
            draw.polygon(rotated(shape, angle, cx, cy), fill=(235, 235, 240))
        return rotated([(-half, -half * 0.8), (half, -half * 0.8), (half, half * 0.8),
                        (-half, half * 0.8)], angle, cx, cy), 'plane'
    r = rng.uniform(10, 20)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 200, 190), outline=(60, 60, 60),
                 width=2)
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)], \
        'storage-tank'


def ship(rng, draw, cx, cy):
    length, width, angle = rng.uniform(20, 34), rng.uniform(6, 10), rng.uniform(0, math.pi)
    hull = rotated([(-length, -width), (length * 0.7, -width), (length, 0), (length * 0.7, width),
                    (-length, width)], angle, cx, cy)
    draw.polygon(hull, fill=(70, 70, 75), outline=(230, 230, 230))
    return rotated([(-length, -width), (length, -width), (length, width), (-length, width)],
                   angle, cx, cy), 'ship'


def write_coco(out, seed, split, num, size, classes, draw_object):
    """Rendered street scenes; ``draw_object(rng, draw, size)`` -> (category id, bbox)."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(out, split), exist_ok=True)
    images, annotations = [], []
    for index in range(num):
        image = textured(rng, size, (90, 90, 95), 25)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size * 0.7, size, size), fill=(60, 60, 60))  # road
        for _ in range(rng.integers(1, 4)):
            category, (x1, y1, w, h) = draw_object(rng, draw, size)
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                                    category_id=category, bbox=[x1, y1, w, h], area=w * h,
                                    iscrowd=0))
        name = f'I{index:04d}.png'
        images.append(dict(id=index + 1, file_name=name, width=size, height=size))
        image.save(osp.join(out, split, name))
    categories = [dict(id=i + 1, name=c) for i, c in enumerate(classes)]
    with open(osp.join(out, f'{split}.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def sign(rng, draw, size):
    cx, cy, r = rng.uniform(30, size - 30), rng.uniform(30, size * 0.65), rng.uniform(14, 26)
    draw.line((cx, cy + r, cx, min(cy + 3 * r, size)), fill=(150, 150, 150), width=3)
    if rng.random() < 0.5:
        draw.polygon([(cx + r * math.cos(math.pi / 8 + k * math.pi / 4),
                       cy + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)],
                     fill=(200, 20, 30), outline=(255, 255, 255))
        return 1, (cx - r, cy - r, 2 * r, 2 * r)
    draw.polygon([(cx - r, cy - r * 0.8), (cx + r, cy - r * 0.8), (cx, cy + r)],
                 fill=(245, 245, 245), outline=(200, 20, 30))
    return 2, (cx - r, cy - r, 2 * r, 2 * r)


def traffic_light(rng, draw, size):
    cx, cy, w = rng.uniform(20, size - 20), rng.uniform(30, size * 0.6), rng.uniform(8, 14)
    h = 2.6 * w
    draw.line((cx, cy + h / 2, cx, min(cy + h * 1.8, size)), fill=(150, 150, 150), width=3)
    draw.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=(25, 25, 25))
    lit = rng.integers(3)
    for k, colour in enumerate(((220, 30, 30), (230, 200, 40), (40, 200, 80))):
        y = cy - h / 2 + h * (k + 0.5) / 3
        r = w * 0.32
        draw.ellipse((cx - r, y - r, cx + r, y + r),
                     fill=colour if k == lit else tuple(c // 4 for c in colour))
    return 1, (cx - w / 2, cy - h / 2, w, h)


def make_heldout_data(out_dir: str, force: bool = False) -> str:
    """Write the held-out mixture to ``out_dir`` unless it is already there."""
    def write(out):
        write_trees(osp.join(out, 'trees'))
        for split, (num, offset) in SPLITS.items():
            write_dota(osp.join(out, 'aerial'), 11 + offset, split, num, 256,
                       ((110, 120, 100), 18), plane_or_tank)
            write_dota(osp.join(out, 'harbor'), 12 + offset, split, num, 256,
                       ((40, 80, 120), 12), ship)
            write_coco(osp.join(out, 'signs'), 13 + offset, split, num, 256,
                       ('stop', 'yield'), sign)
            write_coco(osp.join(out, 'lights'), 14 + offset, split, num, 256,
                       ('traffic-light', ), traffic_light)

    return write_once(out_dir, write, force, version=f'splits={SPLITS}')
