"""Routing heatmaps (dataset x expert, one per MoE layer) from a config and a checkpoint.

    python tools/analysis_tools/plot_routing.py CONFIG CHECKPOINT [--out-dir DIR] [--cfg-options ...]

Runs the config's test set through the model (mmengine's test loop), counts which expert
each dataset's tokens reach in every MoE layer, prints the routing accuracy and saves the
heatmaps (default: <work_dir>/routing).
"""
import argparse
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', default=None)
    parser.add_argument('--work-dir', default=None)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, as in tools/test.py')
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or osp.join('work_dirs', name)
    out_dir = args.out_dir or osp.join(cfg.work_dir, 'routing')
    cfg.load_from = args.checkpoint
    cfg.test_evaluator = dict(type='PerDatasetCocoMetric', heatmap_dir=out_dir)
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    if 'routing/accuracy' not in metrics:
        raise SystemExit(f'{args.config}: the model has no MoE layers, nothing to plot')
    for key in sorted(k for k in metrics if k.startswith('routing/')):
        print(f'{key:<45} {metrics[key]:.3f}')
    print('heatmaps:\n  ' + '\n  '.join(runner.test_evaluator.metrics[0].heatmap_files))


if __name__ == '__main__':
    main()
