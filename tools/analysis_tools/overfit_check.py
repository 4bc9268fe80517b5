"""Overfitting check: train on a handful of images per dataset, evaluate on the same images.

    python tools/analysis_tools/overfit_check.py configs/demo/damex_demo.py \
        [--images-per-dataset 4] [--iters N] [--min-ap50 0.5] [--work-dir DIR]

A detector, data pipeline and loss that work can memorise a few images: every dataset of
the mixture should reach AP50 >= --min-ap50 on its own training images within the
config's iteration budget. Prints the per-dataset AP50 and exits with status 1 if a
dataset falls short. Training-time validation is switched off; one evaluation at the end.
"""
import argparse
import copy
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.runner import Runner


def handful(mixture_cfg, count, pipelines=None, test_mode=False):
    """The mixture restricted to the first ``count`` images of every dataset."""
    mixture_cfg = copy.deepcopy(mixture_cfg)
    for index, entry in enumerate(mixture_cfg['datasets']):
        entry['dataset']['indices'] = count
        entry['dataset']['test_mode'] = test_mode
        if pipelines is not None:
            entry['dataset']['pipeline'] = pipelines[index]
    return mixture_cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--images-per-dataset', type=int, default=4)
    parser.add_argument('--iters', type=int, default=None, help='default: the config\'s')
    parser.add_argument('--min-ap50', type=float, default=0.5)
    parser.add_argument('--work-dir', default=None)
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or osp.join('work_dirs', f'overfit_{name}')
    if args.iters:
        cfg.train_cfg.max_iters = args.iters
        for scheduler in cfg.param_scheduler:
            scheduler.end = args.iters
            if 'milestones' in scheduler:
                scheduler.milestones = [int(args.iters * 0.8)]
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1
    cfg.default_hooks.checkpoint.interval = cfg.train_cfg.max_iters
    train = cfg.train_dataloader.dataset
    test_pipelines = [e['dataset']['pipeline'] for e in cfg.test_dataloader.dataset['datasets']]
    cfg.train_dataloader.dataset = handful(train, args.images_per_dataset)
    cfg.test_dataloader.dataset = handful(train, args.images_per_dataset, test_pipelines,
                                          test_mode=True)
    cfg.val_dataloader.dataset = cfg.test_dataloader.dataset
    print(f'[overfit] {args.images_per_dataset} images per dataset, '
          f'{cfg.train_cfg.max_iters} iterations, evaluated on the same images')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    failed = []
    print('\n[overfit] AP50 on the training images')
    for entry in train['datasets']:
        ap50 = metrics[f'{entry["name"]}/bbox_mAP_50']
        print(f'  {entry["name"]:<12} {ap50:.3f}')
        if ap50 < args.min_ap50:
            failed.append(entry['name'])
    if failed:
        print(f'[overfit] below {args.min_ap50}: {", ".join(failed)}')
        sys.exit(1)
    print(f'[overfit] every dataset reached AP50 >= {args.min_ap50}')


if __name__ == '__main__':
    main()
