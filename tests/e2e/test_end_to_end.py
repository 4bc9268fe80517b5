"""End to end on the real samples, and the command-line entry points (slow)."""
import glob
import os
import os.path as osp
import subprocess
import sys

import pytest
from PIL import Image
from mmengine.runner import Runner

from damex.testing import REPO, tiny_demo_config

pytestmark = pytest.mark.slow


def real_mixture(sample_data, split):
    test_mode = split != 'train'
    pipeline = ([dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                 dict(type='Resize', scale=(256, 256), keep_ratio=True),
                 dict(type='PackDetInputs')] if not test_mode else
                [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(256, 256),
                                                       keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True), dict(type='PackDetInputs')])
    dota = osp.join(sample_data, 'dota_sample')
    return dict(type='DatasetMixture', num_experts=2, datasets=[
        dict(name='dota', dataset=dict(
            type='DOTADataset', ann_file=osp.join(dota, 'labelTxt'), test_mode=test_mode,
            data_prefix=dict(img_path=osp.join(dota, 'images')), pipeline=pipeline)),
        dict(name='neon', dataset=dict(
            type='XMLFolderDataset', ann_file=osp.join(sample_data, 'neon_trees'),
            metainfo=dict(classes=('Tree', )), class_aliases=dict(Alive='Tree', Dead='Tree'),
            test_mode=test_mode, pipeline=pipeline)),
    ])


def test_demo_config_on_the_real_samples(sample_data, tmp_path):
    """Only the data (and num_classes) of damex_demo.py change: train, evaluate, plot."""
    cfg = tiny_demo_config(tmp_path, max_iters=12)
    cfg.model.moe.num_experts = 2
    cfg.model.bbox_head.num_classes = 16
    cfg.train_dataloader.dataset = real_mixture(sample_data, 'train')
    cfg.test_dataloader.dataset = real_mixture(sample_data, 'test')
    cfg.val_dataloader.dataset = real_mixture(sample_data, 'val')
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    metrics = runner.test()
    for name in ('dota', 'neon'):
        for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m',
                    'bbox_mAP_l'):
            assert f'{name}/{key}' in metrics
    assert 0.0 <= metrics['routing/accuracy'] <= 1.0
    heatmaps = glob.glob(osp.join(str(tmp_path), '*', 'vis_data', 'routing', '*.png'))
    assert len(heatmaps) == 3  # one per MoE layer (decoder layers 0, 2, 4)
    with Image.open(heatmaps[0]) as image:
        assert image.format == 'PNG'


def test_mim_train_runs_the_demo_config(demo_data, tmp_path):
    mim = osp.join(osp.dirname(sys.executable), 'mim')
    result = subprocess.run(
        [mim, 'train', 'mmdet', 'configs/demo/damex_demo.py', '--work-dir', str(tmp_path),
         '--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
         'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
         'model.encoder.num_layers=1'],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert osp.exists(osp.join(str(tmp_path), 'iter_2.pth'))
    assert 'loss_damex' in result.stdout + result.stderr


def test_mim_test_and_plot_routing_on_a_checkpoint(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    Runner.from_cfg(cfg).train()
    mim = osp.join(osp.dirname(sys.executable), 'mim')
    result = subprocess.run(
        [mim, 'test', 'mmdet', 'configs/demo/damex_demo.py', '--checkpoint',
         str(tmp_path / 'iter_1.pth'), '--work-dir', str(tmp_path / 'test'),
         '--cfg-options', 'model.encoder.num_layers=1', 'model.num_queries=20',
         'model.dn_cfg.group_cfg.num_dn_queries=10'],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert 'Per-dataset box AP' in output and '| aerial ' in output
    assert 'routing/accuracy' in output

    result = subprocess.run(
        [sys.executable, 'tools/analysis_tools/plot_routing.py', 'configs/demo/damex_demo.py',
         str(tmp_path / 'iter_1.pth'), '--out-dir', str(tmp_path / 'plots'),
         '--work-dir', str(tmp_path / 'plot_work'), '--cfg-options',
         'model.encoder.num_layers=1', 'model.num_queries=20',
         'model.dn_cfg.group_cfg.num_dn_queries=10'],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert 'routing/accuracy' in result.stdout
    assert len(glob.glob(str(tmp_path / 'plots' / 'routing_decoder_layers_*_ffn.png'))) == 3
