"""Print a config's dataset mixtures and check that every file they point to exists.

    python tools/misc/print_mixture.py CONFIG

For each of the train / val / test dataloaders: every dataset's name, type, size,
classes, offset in the unified label space and expert; then the unified classes. Exits
with status 1, listing the problems, if an annotation file or image is missing.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet.registry import DATASETS

import damex  # noqa: F401


def check_files(dataset) -> list:
    """Missing annotation paths and images of one built dataset."""
    problems = []
    ann_file = getattr(dataset, 'ann_file', None)
    if ann_file and not osp.exists(ann_file):
        problems.append(f'annotation path {ann_file} does not exist')
    for index in range(len(dataset)):
        img_path = dataset.get_data_info(index).get('img_path')
        if img_path and not osp.isfile(img_path):
            problems.append(f'image {img_path} does not exist')
    return problems


def describe(split: str, dataset_cfg: dict) -> list:
    try:
        mixture = DATASETS.build(dataset_cfg)
    except (FileNotFoundError, OSError, ValueError, KeyError) as error:
        print(f'[{split}] cannot build the dataset: {error}')
        return [f'{split}: {error}']
    space = getattr(mixture, 'label_space', None)
    if space is None:
        print(f'[{split}] {type(mixture).__name__} with {len(mixture)} samples (not a mixture)')
        return check_files(mixture)
    print(f'[{split}] DatasetMixture: {len(mixture.datasets)} datasets, {len(mixture)} samples, '
          f'{space.num_classes} unified classes')
    print(f'  {"name":<14}{"type":<20}{"size":>7}{"classes":>9}{"offset":>8}{"expert":>8}')
    problems = []
    for entry, dataset in zip(space.datasets, mixture.datasets):
        print(f'  {entry.name:<14}{type(dataset).__name__:<20}{len(dataset):>7}'
              f'{len(entry.classes):>9}{entry.offset:>8}{entry.expert:>8}')
        problems += [f'{split}/{entry.name}: {p}' for p in check_files(dataset)]
    print(f'  unified classes: {", ".join(space.classes)}')
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    problems = []
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader:
            problems += describe(split, loader['dataset'])
    if problems:
        print(f'\n{len(problems)} problems:\n  ' + '\n  '.join(problems[:50]))
        sys.exit(1)
    print('\nall files found')


if __name__ == '__main__':
    main()
