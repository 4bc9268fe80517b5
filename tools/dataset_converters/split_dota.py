"""Split large DOTA images into overlapping patches, in DOTA txt format and as COCO JSON.

    python tools/dataset_converters/split_dota.py IMG_DIR ANN_DIR OUT_DIR \
        [--patch-size 1024] [--overlap 200] [--iof-thr 0.7] [--nproc 2]

Objects are clipped to each patch with shapely; an object is kept in a patch when at least
``iof_thr`` of its area lies inside (objects fully inside are kept unchanged, shifted; a
clipped one becomes the minimum rotated rectangle of its clipped part). Output:
``OUT_DIR/images/<stem>__<size>__<x>___<y>.png``, ``OUT_DIR/labelTxt/<same>.txt`` and
``OUT_DIR/annotations.json`` (horizontal boxes). Runs on several processes with a progress
bar; says how many objects were cut away.
"""
import argparse
import json
import os
import os.path as osp
from typing import List, Sequence, Tuple

import mmengine
from PIL import Image
from shapely.geometry import Polygon, box

Image.MAX_IMAGE_PIXELS = None  # DOTA images are large on purpose


def window_starts(length: int, patch: int, stride: int) -> List[int]:
    """Start offsets covering [0, length) with patches of ``patch`` and step ``stride``."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def read_objects(path: str) -> List[Tuple[List[float], str, str]]:
    """(8 coords, class, difficult) of every object line of a DOTA txt file."""
    from damex.datasets.dota import parse_dota_line
    objects = []
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            if line.strip() and not line.startswith(('imagesource:', 'gsd:')):
                coords, name, difficult = parse_dota_line(line, path, line_no)
                objects.append((coords, name, str(difficult)))
    return objects


def clip_object(coords: Sequence[float], window: Polygon, iof_thr: float):
    """Coordinates of the object inside ``window`` (absolute), or None if too little remains."""
    polygon = Polygon(list(zip(coords[0::2], coords[1::2])))
    if not polygon.is_valid or polygon.area <= 0:
        polygon = polygon.buffer(0)
        if polygon.area <= 0:
            return None
    inside = polygon.intersection(window)
    if inside.area < iof_thr * polygon.area:
        return None
    if inside.area >= polygon.area * (1 - 1e-9):
        return list(coords)
    rect = inside.minimum_rotated_rectangle
    return [v for point in list(rect.exterior.coords)[:4] for v in point]


def split_image(task) -> List[dict]:
    """Write the patches of one image; return their records (file, size, objects, dropped)."""
    img_path, ann_path, out_dir, patch, overlap, iof_thr = task
    stem = osp.splitext(osp.basename(img_path))[0]
    image = Image.open(img_path).convert('RGB')
    width, height = image.size
    objects = read_objects(ann_path)
    stride = patch - overlap
    records = []
    for y0 in window_starts(height, patch, stride):
        for x0 in window_starts(width, patch, stride):
            x1, y1 = min(x0 + patch, width), min(y0 + patch, height)
            window = box(x0, y0, x1, y1)
            name = f'{stem}__{patch}__{x0}___{y0}'
            lines, kept = ['imagesource:split', 'gsd:null'], []
            for coords, cls_name, difficult in objects:
                clipped = clip_object(coords, window, iof_thr)
                if clipped is None:
                    continue
                local = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(clipped)]
                lines.append(' '.join(f'{v:.1f}' for v in local) + f' {cls_name} {difficult}')
                kept.append((local, cls_name, difficult))
            image.crop((x0, y0, x1, y1)).save(osp.join(out_dir, 'images', name + '.png'))
            with open(osp.join(out_dir, 'labelTxt', name + '.txt'), 'w') as f:
                f.write('\n'.join(lines) + '\n')
            records.append(dict(file_name=name + '.png', width=x1 - x0, height=y1 - y0,
                                objects=kept))
    return records


def to_coco(records: List[dict], classes: Sequence[str]) -> dict:
    """COCO JSON with horizontal boxes (the bounds of each patch polygon)."""
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, record in enumerate(records, 1):
        images.append(dict(id=image_id, file_name=record['file_name'], width=record['width'],
                           height=record['height']))
        for coords, cls_name, difficult in record['objects']:
            if cls_name not in cat_ids:
                raise ValueError(f'{record["file_name"]}: unknown class {cls_name!r}')
            xs, ys = coords[0::2], coords[1::2]
            x1, y1 = max(min(xs), 0), max(min(ys), 0)
            x2, y2 = min(max(xs), record['width']), min(max(ys), record['height'])
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=cat_ids[cls_name],
                bbox=[x1, y1, x2 - x1, y2 - y1], area=Polygon(list(zip(xs, ys))).area,
                iscrowd=int(difficult not in ('0', '')), segmentation=[list(coords)]))
    return dict(images=images, annotations=annotations,
                categories=[dict(id=i, name=n) for n, i in cat_ids.items()])


def split_dota(img_dir: str, ann_dir: str, out_dir: str, patch_size: int = 1024,
               overlap: int = 200, iof_thr: float = 0.7, nproc: int = 1,
               classes: Sequence[str] = None) -> dict:
    """Split every image of ``img_dir`` that has a txt in ``ann_dir``; return the COCO dict."""
    from damex.datasets.dota import DOTA_V1_0, find_image
    if overlap >= patch_size:
        raise ValueError(f'overlap ({overlap}) must be smaller than patch_size ({patch_size})')
    os.makedirs(osp.join(out_dir, 'images'), exist_ok=True)
    os.makedirs(osp.join(out_dir, 'labelTxt'), exist_ok=True)
    stems = sorted(osp.splitext(f)[0] for f in os.listdir(ann_dir) if f.endswith('.txt'))
    tasks = [(find_image(img_dir, s), osp.join(ann_dir, s + '.txt'), out_dir, patch_size,
              overlap, iof_thr) for s in stems]
    if nproc > 1:
        results = mmengine.track_parallel_progress(split_image, tasks, nproc)
    else:
        results = mmengine.track_progress(split_image, tasks)
    records = [r for per_image in results for r in per_image]
    coco = to_coco(records, classes or DOTA_V1_0)
    with open(osp.join(out_dir, 'annotations.json'), 'w') as f:
        json.dump(coco, f)
    total = sum(len(read_objects(t[1])) for t in tasks)
    print(f'\n{len(tasks)} images -> {len(records)} patches of {patch_size} (overlap {overlap}); '
          f'{total} objects -> {len(coco["annotations"])} patch objects (kept when >= '
          f'{iof_thr:.0%} of an object lies inside a patch); output in {out_dir}')
    return coco


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('img_dir')
    parser.add_argument('ann_dir')
    parser.add_argument('out_dir')
    parser.add_argument('--patch-size', type=int, default=1024)
    parser.add_argument('--overlap', type=int, default=200)
    parser.add_argument('--iof-thr', type=float, default=0.7)
    parser.add_argument('--nproc', type=int, default=2)
    args = parser.parse_args()
    split_dota(args.img_dir, args.ann_dir, args.out_dir, args.patch_size, args.overlap,
               args.iof_thr, args.nproc)


if __name__ == '__main__':
    main()
