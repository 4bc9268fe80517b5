"""Run a trained model on new images: boxes drawn per image, one JSON for the run.

    python tools/infer.py CONFIG CHECKPOINT INPUT... [--dataset NAME] [--score-thr T]
                          [--out-dir DIR] [--device D]

INPUT: image files or folders (their images, recursively, sorted). Needs only the config and the
checkpoint, no dataset files: the class names and datasets come from the label space the
checkpoint carries, the test pipeline from ``test_dataloader.dataset.pipeline``.

Without ``--dataset`` the model scores its whole unified label space and needs no dataset
id (the DAMEX setting: the router alone picks the experts); with ``--dataset NAME`` only
that dataset's classes are scored. Writes one drawing per image (mmdet's visualizer, boxes
above ``--score-thr``) under ``<out-dir>`` at the image's path relative to the inputs'
common folder, name and extension kept (``in/sub/x.png`` -> ``<out-dir>/sub/x.png``), and
``<out-dir>/predictions.json``: per image its
``path``, parallel lists ``bboxes`` (x1, y1, x2, y2, original pixels), ``scores``,
``classes`` and ``datasets`` (the dataset(s) of each class, '|'-joined where a class is
merged across datasets), and ``routing``: per MoE layer the share of the image's tokens
each expert received. An image that cannot be read is skipped with a warning; the others
are still predicted, ``predictions.json`` always holds every image done, and the exit code
is 1 when any image was skipped.
"""
import argparse
import json
import os
import os.path as osp
import sys
import warnings

import mmcv
import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.utils import ProgressBar

from mmdet.apis import init_detector
from mmdet.registry import VISUALIZERS

import damex  # noqa: F401
from damex.datasets import LabelSpace
from damex.datasets.mixture import stored_pixels
from damex.models.checkpoint_match import CheckpointMismatchError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(inputs):
    """(path, drawing path relative to the out dir) for every image of the inputs."""
    paths = []
    for item in inputs:
        if osp.isdir(item):
            paths += sorted(osp.join(folder, n) for folder, _, names in os.walk(item)
                            for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        elif osp.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f'error: input {item} is neither an image file nor a folder')
    if not paths:
        raise SystemExit(f'error: no images found in {", ".join(inputs)}')
    paths = list(dict.fromkeys(osp.abspath(p) for p in paths))
    root = osp.commonpath([osp.dirname(p) for p in paths])
    return [(path, osp.relpath(path, root)) for path in paths]


def inference_pipeline(cfg) -> Compose:
    """The config's test pipeline, loading the image only (no annotations), pixels as
    stored (as the mixture loads them in training and testing)."""
    steps = [dict(step) for step in stored_pixels(cfg.test_dataloader.dataset.pipeline)
             if step['type'] not in ('LoadAnnotations', 'mmdet.LoadAnnotations')]
    last = steps[-1]
    if 'meta_keys' in last:
        last['meta_keys'] = tuple(k for k in last['meta_keys'] if k != 'img_id')
    return Compose(steps)


def class_datasets(space: LabelSpace):
    """For each unified class, the dataset(s) it belongs to."""
    owners = [[] for _ in space.classes]
    for entry in space.datasets:
        for unified in entry.label_map:
            owners[unified].append(entry.name)
    return ['|'.join(names) for names in owners]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('inputs', nargs='+', metavar='INPUT')
    parser.add_argument('--dataset', help='score only this dataset\'s classes')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw and write boxes with at least this score (default 0.3)')
    parser.add_argument('--out-dir', default='outputs')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()

    try:
        model = init_detector(args.config, args.checkpoint, device=args.device)
    except CheckpointMismatchError as error:
        raise SystemExit(f'error: {args.checkpoint} does not fit {args.config}: {error}')
    space = getattr(model, 'label_space', None)
    if space is None:
        raise SystemExit(f'error: {args.checkpoint} carries no label space; re-save it from a '
                         'damex training run')
    if args.dataset is not None and args.dataset not in space.names:
        raise SystemExit(f'error: unknown --dataset {args.dataset!r}; the model knows '
                         f'{", ".join(space.names)}')
    owners = class_datasets(space)
    pipeline = inference_pipeline(model.cfg)
    visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name='damex_infer'))
    visualizer.dataset_meta = dict(classes=space.classes, palette='random')
    layers = list(getattr(model, 'moe_layers', {}))
    os.makedirs(args.out_dir, exist_ok=True)

    images = list_images(args.inputs)
    records, skipped = [], []
    out_json = osp.join(args.out_dir, 'predictions.json')
    progress = ProgressBar(len(images))
    try:
        for path, drawing in images:
            try:
                data = pipeline(dict(img_path=path, img_id=0))
                # stored pixels (no EXIF rotation); mmcv converts channels only for 'color'
                image = mmcv.bgr2rgb(mmcv.imread(path, flag='color_ignore_orientation'))
            except Exception as error:  # unreadable or corrupt: every decoder fails its own way
                warnings.warn(f'skipped {path}: it cannot be read as an image ({error})')
                skipped.append(path)
                progress.update()
                continue
            records.append(predict_one(model, data, args, space, owners, layers, visualizer,
                                       image, osp.join(args.out_dir, drawing), path))
            progress.update()
    finally:
        with open(out_json, 'w') as f:
            json.dump(records, f, indent=1)
    print(f'\n{len(records)} images: drawings and {out_json}')
    if skipped:
        print(f'{len(skipped)} image(s) skipped, they could not be read:\n  '
              + '\n  '.join(skipped), file=sys.stderr)
        sys.exit(1)


def predict_one(model, data, args, space, owners, layers, visualizer, image, out_file, path):
    """Predict one image, draw it to ``out_file`` and return its record."""
    if args.dataset is not None:
        data['data_samples'].set_metainfo(dict(dataset_name=args.dataset))
    with torch.no_grad():
        result = model.test_step(pseudo_collate([data]))[0]
    pred = result.pred_instances
    pred = pred[pred.scores >= args.score_thr]
    labels = pred.labels.tolist()
    record = dict(path=path, bboxes=pred.bboxes.tolist(),
                  scores=pred.scores.tolist(), classes=[space.classes[i] for i in labels],
                  datasets=[owners[i] for i in labels])
    if layers:
        counts = result.routing_counts.double()
        shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)
        record['routing'] = {name: share.tolist() for name, share in zip(layers, shares)}
    result.pred_instances = pred
    os.makedirs(osp.dirname(out_file), exist_ok=True)
    visualizer.add_datasample(osp.basename(out_file), image, data_sample=result,
                              draw_gt=False, show=False, pred_score_thr=args.score_thr,
                              out_file=out_file)
    return record


if __name__ == '__main__':
    main()
