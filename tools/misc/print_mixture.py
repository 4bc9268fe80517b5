"""Print a config's dataset mixtures and check that every file they point to exists.

    python tools/misc/print_mixture.py CONFIG [--check-images]

For each of the train / val / test dataloaders: every dataset's name, type, size,
classes, offset in the unified label space and expert, and its boxes per class (ignored
ones counted apart); then the unified classes. Exits
with status 1, listing the problems, if an annotation file or image is missing, or if the
model does not fit the mixture (``model.bbox_head.num_classes`` against the unified label
space, ``model.moe.num_experts`` against the expert map: the checks ExpertMapCheckHook
runs before training). ``--check-images`` also decodes every image, fully, and lists the
unreadable ones (corrupt or truncated files) with their paths.
"""
import argparse
import collections
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.utils import ProgressBar
from PIL import Image
from mmengine.registry import init_default_scope

from mmdet.registry import DATASETS

import damex  # noqa: F401
from damex.engine.hooks import check_mixture


def unreadable(img_path: str):
    """Why the image cannot be decoded in full, or None."""
    try:
        with Image.open(img_path) as image:
            image.load()  # decodes every pixel: truncated files fail here
    except Exception as error:  # PIL raises several types for bad files
        return f'{type(error).__name__}: {error}'
    return None


def check_files(dataset, check_images: bool = False) -> list:
    """Missing annotation paths and images of one built dataset (and unreadable images)."""
    problems = []
    ann_file = getattr(dataset, 'ann_file', None)
    if ann_file and not osp.exists(ann_file):
        problems.append(f'annotation path {ann_file} does not exist')
    paths = [dataset.get_data_info(i).get('img_path') for i in range(len(dataset))]
    progress = ProgressBar(len(paths)) if check_images and paths else None
    for img_path in paths:
        if img_path and not osp.isfile(img_path):
            problems.append(f'image {img_path} does not exist')
        elif img_path and check_images:
            reason = unreadable(img_path)
            if reason:
                problems.append(f'image {img_path} is unreadable ({reason})')
        if progress:
            progress.update()
    if progress:
        print()
    return problems


def boxes_per_class(dataset, classes) -> str:
    """'car 12 (+1 ignored), face 3, ...' over every loaded box of the dataset."""
    counts = collections.Counter()
    for i in range(len(dataset)):
        for inst in dataset.get_data_info(i).get('instances', []):
            counts[(inst['bbox_label'], bool(inst.get('ignore_flag', 0)))] += 1
    parts = []
    for label, name in enumerate(classes):
        ignored = f' (+{counts[(label, True)]} ignored)' if counts[(label, True)] else ''
        parts.append(f'{name} {counts[(label, False)]}{ignored}')
    return ', '.join(parts)


def check_model(split: str, space, model_cfg, trained) -> list:
    """The model-against-mixture checks, from the config alone (no model is built).

    The training mixture is the model's label space; val / test mixtures must be subsets
    of it (by dataset and class name).
    """
    head = model_cfg.get('bbox_head') or {}
    moe = model_cfg.get('moe') or {}
    num_experts = moe.get('num_experts', 8) if model_cfg.get('moe') is not None else None
    try:
        check_mixture(space, head.get('num_classes'), num_experts, trained,
                      training=trained is None)
    except (ValueError, KeyError) as error:
        return [f'{split}: {error}']
    return []


def describe(split: str, dataset_cfg: dict, model_cfg: dict, trained=None,
             check_images: bool = False) -> tuple:
    try:
        mixture = DATASETS.build(dataset_cfg)
    except (FileNotFoundError, OSError, ValueError, KeyError) as error:
        print(f'[{split}] cannot build the dataset: {error}')
        return [f'{split}: {error}'], None
    space = getattr(mixture, 'label_space', None)
    if space is None:
        print(f'[{split}] {type(mixture).__name__} with {len(mixture)} samples (not a mixture)')
        return check_files(mixture, check_images), None
    table = mixture.summary().splitlines()
    print(f'[{split}] {table[0]}')
    print(table[1])
    problems = []
    for entry, dataset, row in zip(space.datasets, mixture.datasets, table[2:]):
        print(row)
        print(f'    boxes: {boxes_per_class(dataset, entry.classes)}')
        problems += [f'{split}/{entry.name}: {p}'
                     for p in check_files(dataset, check_images)]
    print(f'  unified classes: {", ".join(space.classes)}')
    return problems + check_model(split, space, model_cfg, trained), space


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--check-images', action='store_true',
                        help='decode every image and list the unreadable ones')
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    problems = []
    trained = None
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader:
            found, space = describe(split, loader['dataset'], cfg.get('model', {}), trained,
                                    args.check_images)
            problems += found
            if split == 'train':
                trained = space
    if problems:
        print(f'\n{len(problems)} problems:\n  ' + '\n  '.join(problems[:50]))
        sys.exit(1)
    print('\nall files found')


if __name__ == '__main__':
    main()
