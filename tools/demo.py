"""The main job: train the demo DAMEX-DINO on the demo mixture on CPU, evaluate, plot.

    make demo                               # DAMEX (configs/demo/damex_demo.py)
    make demo DEMO_ARGS="--variant dense"   # the DINO baseline; "--variant moe": vanilla MoE

Writes the demo mixture (data/demo), trains with mmengine's Runner (progress in the log),
evaluates per dataset, prints the AP table and the routing accuracy, and saves a loss
curve and the routing heatmaps (paths printed at the end).
"""
import argparse
import json
import os
import os.path as osp

from mmengine.config import Config
from mmengine.runner import Runner

from damex.compat import silence_known_warnings
from damex.synthetic import make_demo_data
from damex.visualization import plot_loss_curve

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def read_losses(log_dir: str):
    """(iterations, total losses) from mmengine's scalars.json of a run."""
    path = osp.join(log_dir, 'vis_data', 'scalars.json')
    iterations, losses = [], []
    if osp.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if 'loss' in record:
                    iterations.append(record.get('iter', record.get('step')))
                    losses.append(record['loss'])
    return iterations, losses


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', choices=('damex', 'dense', 'moe'), default='damex',
                        help='DAMEX, the dense DINO baseline, or vanilla MoE')
    parser.add_argument('--iters', type=int, default=None, help='training iterations')
    parser.add_argument('--work-dir', default=None)
    return parser.parse_args()


def main():
    args = parse_args()
    silence_known_warnings()
    os.chdir(ROOT)
    print(f'[demo] writing the demo mixture to {make_demo_data(osp.join(ROOT, "data", "demo"))}')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'demo', f'{args.variant}_demo.py'))
    cfg.work_dir = args.work_dir or osp.join(ROOT, 'work_dirs', f'{args.variant}_demo')
    if args.iters:
        cfg.train_cfg.max_iters = args.iters
        cfg.param_scheduler[0].end = args.iters
        cfg.param_scheduler[0].milestones = [int(args.iters * 0.8)]
        cfg.default_hooks.checkpoint.interval = args.iters
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1  # evaluated once, below
    print(f'[demo] training {args.variant} for {cfg.train_cfg.max_iters} iterations on CPU; '
          f'logs and checkpoints in {cfg.work_dir}')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.test()
    iterations, losses = read_losses(runner.log_dir)
    curve = plot_loss_curve(iterations, losses, osp.join(cfg.work_dir, 'loss_curve.png'),
                            title=f'{args.variant} demo: total training loss')
    names = cfg.test_dataloader.dataset.datasets
    print('\n[demo] results (each dataset in its own label space)')
    print(f'{"dataset":<10} {"AP":>6} {"AP50":>6}')
    for entry in names:
        print(f'{entry.name:<10} {metrics[entry.name + "/bbox_mAP"]:6.3f} '
              f'{metrics[entry.name + "/bbox_mAP_50"]:6.3f}')
    print(f'{"mean":<10} {metrics["mean/bbox_mAP"]:6.3f} {metrics["mean/bbox_mAP_50"]:6.3f}')
    if 'routing/accuracy' in metrics:
        print(f'[demo] routing accuracy (tokens reaching their dataset\'s expert): '
              f'{metrics["routing/accuracy"]:.3f}')
        heatmaps = runner.test_evaluator.metrics[0].heatmap_files
        print('[demo] routing heatmaps:\n  ' + '\n  '.join(heatmaps))
    print(f'[demo] loss curve: {curve}')


if __name__ == '__main__':
    main()
