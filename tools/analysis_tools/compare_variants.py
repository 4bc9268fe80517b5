"""Held-out benchmark: dense DINO, two vanilla MoEs and four DAMEX variants, same data and seeds.

    python tools/analysis_tools/compare_variants.py [--iters 250] [--seeds 0 1]
        [--work-dir work_dirs/compare_variants] [--out-md TABLE.md] [--plot PLOT.png]

Data: ``tools/misc/make_heldout_data.py`` (data/heldout): five datasets (trees, aerial,
harbor, signs, lights) from three domains on three experts, with disjoint training and
validation images, so the expert map is a real choice and the numbers are held out.

Variants, at equal iterations and seeds (the demo's CPU-sized DAMEX-DINO, one encoder
layer, 30 queries, 256 px; MoE in decoder layers 0, 2, 4):
- ``dense``: DINO with dense FFNs;
- ``moe``: vanilla MoE (noisy top-1, importance + load losses);
- ``moe-auxfree``: vanilla MoE balanced without auxiliary losses (``balance='aux_free'``);
- ``damex-hand``: DAMEX with the map a person writes from the names alone (in listing
  order, round robin: trees 0, aerial 1, harbor 2, signs 0, lights 1);
- ``damex-plan``: DAMEX with ``plan_experts.py``'s map (computed on the untrained model of
  the same seed) and plan-initialised routers;
- ``damex-forced``: DAMEX, hand map, every token forced to its expert for the first 20% of
  the iterations (``ForcedRoutingHook``);
- ``damex-shared``: DAMEX, hand map, with a shared expert of width ``SHARED_EXPERT_WIDTH``.
Reports per-dataset AP and the mean AP on the validation images with a 90% bootstrap
interval over validation images (images resampled within each dataset, seeds pooled:
:mod:`damex.evaluation.bootstrap`); the mean AP again with ``dataset_aware=False`` (the
whole trained label space scored: no dataset id at inference, the DAMEX claim), with its
interval; routing accuracy on validation images (against each variant's own map; the
vanilla MoE against the hand map), routing accuracy at 10% of training (telemetry) and
seconds per iteration (mean and min-max over seeds). Writes a markdown table, the pairs of
variants whose mean-AP intervals do not overlap, and a plot of training routing accuracy
over iterations per variant.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

import numpy as np
from matplotlib.figure import Figure
from mmengine.config import Config
from mmengine.runner import Runner

from damex.compat import silence_known_warnings
from damex.evaluation.bootstrap import DatasetEvaluation, bootstrap_ap
from damex.synthetic import make_heldout_data

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

DATASETS = [  # name, type, classes
    ('trees', 'XMLFolderDataset', ('Tree', )),
    ('aerial', 'DOTADataset', ('plane', 'storage-tank')),
    ('harbor', 'DOTADataset', ('ship', )),
    ('signs', 'CocoDataset', ('stop', 'yield')),
    ('lights', 'CocoDataset', ('traffic-light', )),
]
HAND_MAP = dict(trees=0, aerial=1, harbor=2, signs=0, lights=1)
VARIANTS = ('dense', 'moe', 'moe-auxfree', 'damex-hand', 'damex-plan', 'damex-forced',
            'damex-shared')
#: the shared expert of 'damex-shared': half the width of each routed expert (512)
SHARED_EXPERT_WIDTH = 256
NUM_EXPERTS = 3


def dataset_cfg(root, name, kind, classes, split):
    base = dict(data_root=f'{root}/{name}/', metainfo=dict(classes=classes),
                test_mode=split != 'train')
    if kind == 'XMLFolderDataset':
        return dict(type=kind, ann_file=split, data_prefix=dict(img_path=split), **base)
    if kind == 'DOTADataset':
        return dict(type=kind, ann_file=f'{split}/labelTxt',
                    data_prefix=dict(img_path=f'{split}/images'), **base)
    return dict(type=kind, ann_file=f'{split}.json', data_prefix=dict(img=f'{split}/'),
                filter_cfg=dict(filter_empty_gt=False), **base)


def mixture(root, split, pipeline, experts=None, plan=None):
    entries = []
    for name, kind, classes in DATASETS:
        entry = dict(name=name, dataset=dataset_cfg(root, name, kind, classes, split))
        if experts is not None:
            entry['expert'] = experts[name]
        entries.append(entry)
    cfg = dict(type='DatasetMixture', num_experts=NUM_EXPERTS, pipeline=pipeline,
               datasets=entries)
    if plan is not None:
        cfg['expert_plan'] = plan
    return cfg


def base_config(root, seed, iters, work_dir):
    cfg = Config.fromfile(osp.join(ROOT, 'configs/demo/damex_demo.py'))
    cfg.work_dir = work_dir
    cfg.model.encoder.num_layers = 1
    cfg.model.num_queries = 30
    cfg.model.dn_cfg.group_cfg.num_dn_queries = 10
    cfg.model.test_cfg.max_per_img = 30
    cfg.model.bbox_head.num_classes = sum(len(c) for _, _, c in DATASETS)
    cfg.train_dataloader.dataset = mixture(root, 'train', cfg.train_pipeline, HAND_MAP)
    cfg.val_dataloader.dataset = mixture(root, 'val', cfg.test_pipeline, HAND_MAP)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters + 1,
                         val_begin=iters + 1)
    cfg.param_scheduler = [dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
                                milestones=[int(iters * 0.8)], gamma=0.1)]
    cfg.default_hooks.logger.interval = 5
    cfg.default_hooks.checkpoint = dict(type='CrashSafeCheckpointHook', by_epoch=False,
                                        interval=iters)
    cfg.randomness = dict(seed=seed)
    return cfg


def variant_config(variant, root, seed, iters, work_dir):
    cfg = base_config(root, seed, iters, work_dir)
    if variant == 'dense':
        cfg.model.pop('moe')
    elif variant == 'moe':
        cfg.model.moe.router = dict(type='SoftmaxTokenChoiceRouter', top_k=1, noise_std=1.0)
        cfg.model.moe.aux_loss_weights = dict(importance=0.005, load=0.005)
    elif variant == 'moe-auxfree':  # balanced by the choice bias, no balance losses
        cfg.model.moe.router = dict(type='SoftmaxTokenChoiceRouter', top_k=1, noise_std=1.0,
                                    balance='aux_free', bias_update_rate=1e-3)
        cfg.model.moe.aux_loss_weights = dict()
    elif variant == 'damex-shared':
        cfg.model.moe.shared_expert = dict(feedforward_channels=SHARED_EXPERT_WIDTH)
    elif variant == 'damex-plan':
        plan = osp.join(work_dir, 'PLAN.json')
        config = osp.join(work_dir, 'plan_config.py')
        os.makedirs(work_dir, exist_ok=True)
        cfg.dump(config)
        subprocess.run([sys.executable, osp.join(ROOT, 'tools/analysis_tools/plan_experts.py'),
                        config, '--num-experts', str(NUM_EXPERTS), '--images-per-dataset', '8',
                        '--seed', str(seed), '--out', plan], check=True,
                       stdout=subprocess.DEVNULL)
        cfg.train_dataloader.dataset = mixture(root, 'train', cfg.train_pipeline, plan=plan)
        cfg.val_dataloader.dataset = mixture(root, 'val', cfg.test_pipeline, plan=plan)
        cfg.test_dataloader = cfg.val_dataloader
        cfg.model.moe.router = dict(type='DatasetAwareRouter', noise_std=1.0,
                                    init_from_plan=plan)
    elif variant == 'damex-forced':
        cfg.custom_hooks = list(cfg.custom_hooks) + [
            dict(type='ForcedRoutingHook', iters=max(1, iters // 5))]
    return cfg


def scalars(work_dir):
    path = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))[-1]
    return [json.loads(line) for line in open(path) if '"loss"' in line]


def run(variant, root, seed, iters, work_dir):
    cfg = variant_config(variant, root, seed, iters, work_dir)
    cfg.experiment_name = f'{variant}_seed{seed}'
    # one visualizer per run: mmengine reuses an instance of the same name (and its dir)
    cfg.visualizer = dict(cfg.visualizer, name=f'visualizer_{variant}_seed{seed}')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metric = runner.val_loop.evaluator.metrics[0]
    metrics = runner.val()
    evaluations = {name: DatasetEvaluation(**inputs)
                   for name, inputs in metric.evaluation_inputs.items()}
    runner.model.bbox_head.dataset_aware = False  # the whole trained label space scored
    agnostic = runner.val()
    agnostic_evaluations = {name: DatasetEvaluation(**inputs)
                            for name, inputs in metric.evaluation_inputs.items()}
    rows = scalars(work_dir)
    result = dict(variant=variant, seed=seed, metrics=metrics,
                  agnostic_mean_ap=agnostic.get('mean/bbox_mAP'),
                  seconds_per_iter=float(np.mean([r['time'] for r in rows[2:]] or [np.nan])),
                  _evaluations=evaluations, _agnostic_evaluations=agnostic_evaluations)
    curve = [(r['iter'], r['routing/train_accuracy']) for r in rows
             if 'routing/train_accuracy' in r]
    result['routing_curve'] = curve
    if curve:
        target = 0.1 * iters
        result['routing_at_10pct'] = min(curve, key=lambda c: abs(c[0] - target))[1]
    if variant == 'damex-plan':
        result['plan'] = json.load(open(osp.join(work_dir, 'PLAN.json')))['experts']
    return result


def summary(values):
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return 'n/a'
    return f'{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})'


def interval(value):
    ap, low, high = value
    return f'{ap:.3f} [{low:.3f}, {high:.3f}]'


def intervals(results, num_samples):
    """Per variant: bootstrap (AP, low, high) per dataset and of the mean, dataset-aware and
    not (seeds pooled)."""
    out = {}
    for variant in VARIANTS:
        runs = [r for r in results if r['variant'] == variant]
        if runs:
            out[variant] = dict(
                aware=bootstrap_ap([r['_evaluations'] for r in runs], num_samples),
                agnostic=bootstrap_ap([r['_agnostic_evaluations'] for r in runs],
                                      num_samples)['mean'])
    return out


def table(results, iters, bootstrapped):
    names = [d for d, _, _ in DATASETS]
    header = (['variant'] + [f'{n} AP' for n in names] +
              ['mean AP', 'mean AP, dataset_aware=False', 'routing acc. (val)',
               f'routing acc. @{iters // 10} it', 's / it'])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for variant, boot in bootstrapped.items():
        runs = [r for r in results if r['variant'] == variant]
        cells = [variant]
        for name in names:
            cells.append(interval(boot['aware'][name]) if name in boot['aware'] else 'n/a')
        cells.append(interval(boot['aware']['mean']))
        cells.append(interval(boot['agnostic']))
        cells.append(summary([r['metrics'].get('routing/accuracy') for r in runs]))
        cells.append(summary([r.get('routing_at_10pct') for r in runs]))
        cells.append(summary([r['seconds_per_iter'] for r in runs]))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def separated_pairs(bootstrapped, key='mean'):
    """Pairs of variants whose mean-AP intervals do not overlap (a conservative test), at
    the table's precision (3 decimals)."""
    pairs = []
    items = list(bootstrapped.items())
    for i, (a, boot_a) in enumerate(items):
        for b, boot_b in items[i + 1:]:
            (ap_a, low_a, high_a), (ap_b, low_b, high_b) = (
                [round(v, 3) for v in boot_a['aware'][key]],
                [round(v, 3) for v in boot_b['aware'][key]])
            if low_a > high_b or low_b > high_a:
                pairs.append((a, b) if ap_a > ap_b else (b, a))
    return pairs


def plot(results, path):
    fig = Figure(figsize=(7, 4))  # no pyplot: no backend, no global state
    ax = fig.subplots()
    for variant in VARIANTS:
        curves = [r['routing_curve'] for r in results if r['variant'] == variant
                  and r['routing_curve']]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        iters = [c[0] for c in curves[0][:length]]
        mean = np.mean([[c[1] for c in curve[:length]] for curve in curves], axis=0)
        ax.plot(iters, mean, label=variant)
    ax.set_xlabel('iteration')
    ax.set_ylabel('routing accuracy (training batches)')
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title('share of each dataset\'s tokens at its expert, mean over seeds')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    silence_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=250)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'compare_variants'))
    parser.add_argument('--data', default=osp.join(ROOT, 'data', 'heldout'))
    parser.add_argument('--out-md', default=None)
    parser.add_argument('--plot', default=None)
    parser.add_argument('--bootstrap', type=int, default=200,
                        help='bootstrap replicates of the validation images (default 200)')
    args = parser.parse_args()
    root = make_heldout_data(args.data)
    start = time.time()
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            print(f'[{time.time() - start:7.0f} s] {variant}, seed {seed}', flush=True)
            work_dir = osp.join(args.work_dir, f'{variant}_seed{seed}')
            results.append(run(variant, root, seed, args.iters, work_dir))
    print(f'[{time.time() - start:7.0f} s] bootstrap ({args.bootstrap} replicates)', flush=True)
    bootstrapped = intervals(results, args.bootstrap)
    elapsed = time.time() - start
    markdown = table(results, args.iters, bootstrapped)
    plans = {r['seed']: r['plan'] for r in results if 'plan' in r}
    separated = separated_pairs(bootstrapped)
    text = (f'{args.iters} iterations, seeds {args.seeds}, {elapsed / 60:.1f} min in all; '
            f'AP [90% bootstrap interval over validation images, seeds pooled]\n\n'
            f'{markdown}\n\nmean AP intervals that do not overlap (higher first): '
            f'{separated or "none"}\n\nplanned maps: {json.dumps(plans)}\n')
    print(text)
    out_md = args.out_md or osp.join(args.work_dir, 'compare_variants.md')
    with open(out_md, 'w') as f:
        f.write(text)
    with open(osp.join(args.work_dir, 'compare_variants.json'), 'w') as f:
        json.dump(dict(runs=[{k: v for k, v in r.items() if not k.startswith('_')}
                             for r in results], intervals=bootstrapped), f, indent=1)
    plot_path = args.plot or osp.join(args.work_dir, 'routing_accuracy.png')
    plot(results, plot_path)
    print(f'wrote {out_md} and {plot_path}')


if __name__ == '__main__':
    main()
