"""Write the demo mixture under data/demo/: three datasets, three formats, three domains.

- trees  (VOC XML, real): the two NEON tree tiles of assets/neon_trees, each cut into
  four 200x200 quarters (boxes clipped, kept when >= 50% of a crown stays inside).
- aerial (DOTA txt, rendered): planes (crosses) and storage tanks (discs) on a textured
  ground, with their quadrilaterals, classes 'plane' and 'storage-tank'.
- signs  (COCO JSON, rendered): stop (red octagons) and yield (white/red triangles)
  signs on a street-like background.

Deterministic (fixed seeds): the same files on every machine. Train and val hold the
same images: the demo is a small end-to-end run and an overfitting check, not a
generalisation benchmark.
"""
import json
import math
import os
import os.path as osp
import shutil
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

#: the repository (the NEON tree tiles live in its assets/ folder)
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SPLITS = ('train', 'val')


def write_trees(out: str) -> None:
    """Quarter each NEON tile; write the crops and clipped VOC boxes."""
    src = neon_trees_folder()
    for split in SPLITS:
        os.makedirs(osp.join(out, split), exist_ok=True)
    for stem in ('OSBS_029', 'SOAP_061'):
        image = Image.open(osp.join(src, stem + '.png')).convert('RGB')
        boxes = [[float(o.find('bndbox').findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
                 for o in ET.parse(osp.join(src, stem + '.xml')).getroot().iter('object')]
        for qy in range(2):
            for qx in range(2):
                x0, y0 = qx * 200, qy * 200
                name = f'{stem}_{qy}{qx}'
                kept = []
                for x1, y1, x2, y2 in boxes:
                    cx1, cy1 = max(x1, x0), max(y1, y0)
                    cx2, cy2 = min(x2, x0 + 200), min(y2, y0 + 200)
                    if cx2 <= cx1 or cy2 <= cy1:
                        continue
                    if (cx2 - cx1) * (cy2 - cy1) >= 0.5 * (x2 - x1) * (y2 - y1):
                        kept.append((cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
                crop = image.crop((x0, y0, x0 + 200, y0 + 200))
                for split in SPLITS:
                    crop.save(osp.join(out, split, name + '.png'))
                    write_voc(osp.join(out, split, name + '.xml'), name + '.png', kept)


def neon_trees_folder() -> str:
    """The real NEON tree tiles the tree datasets are cut from (assets/neon_trees)."""
    src = osp.join(ROOT, 'assets', 'neon_trees')
    if not osp.isdir(src):
        raise FileNotFoundError(f'{src} is missing: the synthetic mixtures cut their tree '
                                'images from it; run from a damex checkout (pip install -e .)')
    return src


def write_voc(path: str, filename: str, boxes) -> None:
    objects = ''.join(
        f'<object><name>Tree</name><difficult>0</difficult><bndbox><xmin>{b[0]:.0f}</xmin>'
        f'<ymin>{b[1]:.0f}</ymin><xmax>{b[2]:.0f}</xmax><ymax>{b[3]:.0f}</ymax></bndbox></object>'
        for b in boxes)
    with open(path, 'w') as f:
        f.write(f'<annotation><filename>{filename}</filename><size><width>200</width>'
                f'<height>200</height><depth>3</depth></size>{objects}</annotation>\n')


def textured(rng, size, base, spread):
    noise = rng.normal(0, spread, (size // 8, size // 8, 3))
    ground = np.clip(np.asarray(base) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(ground).resize((size, size), Image.BILINEAR)


def rotated(points, angle, cx, cy):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def write_aerial(out: str, num_images: int = 8, size: int = 256) -> None:
    rng = np.random.default_rng(1)
    for split in SPLITS:
        os.makedirs(osp.join(out, split, 'images'), exist_ok=True)
        os.makedirs(osp.join(out, split, 'labelTxt'), exist_ok=True)
    for index in range(num_images):
        image = textured(rng, size, (110, 120, 100), 18)
        draw = ImageDraw.Draw(image)
        lines = ['imagesource:rendered', 'gsd:1.0']
        for _ in range(rng.integers(2, 5)):
            cx, cy = rng.uniform(40, size - 40, 2)
            if rng.random() < 0.5:  # plane: a cross, fuselage along the angle
                half, angle = rng.uniform(18, 30), rng.uniform(0, math.pi)
                body = rotated([(-half, -4), (half, -4), (half, 4), (-half, 4)], angle, cx, cy)
                wings = rotated([(-4, -half * 0.8), (4, -half * 0.8), (4, half * 0.8),
                                 (-4, half * 0.8)], angle, cx, cy)
                draw.polygon(body, fill=(235, 235, 240))
                draw.polygon(wings, fill=(235, 235, 240))
                quad = rotated([(-half, -half * 0.8), (half, -half * 0.8), (half, half * 0.8),
                                (-half, half * 0.8)], angle, cx, cy)
                cls = 'plane'
            else:  # storage tank: a bright disc with a dark rim
                r = rng.uniform(10, 20)
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 200, 190),
                             outline=(60, 60, 60), width=2)
                quad = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
                cls = 'storage-tank'
            coords = ' '.join(f'{min(max(v, 0), size - 1):.1f}' for p in quad for v in p)
            lines.append(f'{coords} {cls} 0')
        for split in SPLITS:
            image.save(osp.join(out, split, 'images', f'A{index:04d}.png'))
            with open(osp.join(out, split, 'labelTxt', f'A{index:04d}.txt'), 'w') as f:
                f.write('\n'.join(lines) + '\n')


def write_signs(out: str, num_images: int = 8, size: int = 256) -> None:
    rng = np.random.default_rng(2)
    categories = [dict(id=1, name='stop'), dict(id=2, name='yield')]
    images, annotations = [], []
    for split in SPLITS:
        os.makedirs(osp.join(out, split), exist_ok=True)
    for index in range(num_images):
        image = textured(rng, size, (90, 90, 95), 25)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size * 0.7, size, size), fill=(60, 60, 60))  # road
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(30, size - 30), rng.uniform(30, size * 0.65)
            r = rng.uniform(14, 26)
            draw.line((cx, cy + r, cx, min(cy + 3 * r, size)), fill=(150, 150, 150), width=3)
            if rng.random() < 0.5:
                octagon = [(cx + r * math.cos(math.pi / 8 + k * math.pi / 4),
                            cy + r * math.sin(math.pi / 8 + k * math.pi / 4)) for k in range(8)]
                draw.polygon(octagon, fill=(200, 20, 30), outline=(255, 255, 255))
                category = 1
            else:
                triangle = [(cx - r, cy - r * 0.8), (cx + r, cy - r * 0.8), (cx, cy + r)]
                draw.polygon(triangle, fill=(245, 245, 245), outline=(200, 20, 30))
                category = 2
            x1, y1 = cx - r, cy - r
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                                    category_id=category, bbox=[x1, y1, 2 * r, 2 * r],
                                    area=4 * r * r, iscrowd=0))
        name = f'S{index:04d}.png'
        images.append(dict(id=index + 1, file_name=name, width=size, height=size))
        for split in SPLITS:
            image.save(osp.join(out, split, name))
    for split in SPLITS:
        with open(osp.join(out, f'{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def write_once(out_dir: str, write, force: bool = False, version: str = '') -> str:
    """Call ``write(out_dir)`` on an empty ``out_dir`` unless a finished copy is there.

    A ``.complete`` stamp, written last, marks a finished copy, so an interrupted run is
    redone from scratch rather than leaving half a dataset. It holds ``version`` (what the
    writer writes, e.g. its split sizes): a copy written with another version is rewritten,
    never silently reused.
    """
    stamp = osp.join(out_dir, '.complete')
    if osp.exists(stamp) and not force:
        with open(stamp) as f:
            if f.read() == version:
                return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    write(out_dir)
    with open(stamp, 'w') as f:
        f.write(version)
    return out_dir


def make_demo_data(out_dir: str, force: bool = False) -> str:
    """Write the demo mixture to ``out_dir`` unless it is already there."""
    def write(out):
        write_trees(osp.join(out, 'trees'))
        write_aerial(osp.join(out, 'aerial'))
        write_signs(osp.join(out, 'signs'))

    return write_once(out_dir, write, force)
