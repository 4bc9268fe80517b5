"""Exact resume and the failure cases of the detector (kills: test_crash_safe_checkpoints)."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner

from mmdet.registry import DATASETS, MODELS

from damex.testing import tiny_demo_config


def deterministic(cfg):
    cfg.randomness = dict(seed=7, deterministic=True)
    return cfg


def train_losses(runner):
    return runner.message_hub.get_scalar('train/loss').data[0].tolist()


@pytest.mark.parametrize('config', ['configs/demo/damex_demo.py',
                                    'configs/demo/moe_auxfree_demo.py'])
@pytest.mark.slow  # trains or spawns a process
def test_resumed_run_continues_with_the_same_losses(demo_data, tmp_path, config):
    # the aux-free config: its expert bias (a buffer moved every step) resumes bit-exactly
    straight = Runner.from_cfg(deterministic(tiny_demo_config(tmp_path / 'straight', config,
                                                              max_iters=4)))
    straight.train()
    expected = train_losses(straight)

    first = Runner.from_cfg(deterministic(tiny_demo_config(tmp_path / 'stopped', config,
                                                           max_iters=2)))
    first.train()
    assert train_losses(first) == expected[:2]
    cfg = deterministic(tiny_demo_config(tmp_path / 'stopped', config, max_iters=4))
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    # the message hub is resumed too: its history holds iterations 1-2 and then 3-4
    assert train_losses(resumed)[-2:] == pytest.approx(expected[2:], rel=1e-6, abs=1e-6)
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        if name.endswith('expert_bias'):
            assert torch.equal(a, b) and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope='module')
def tiny_model(demo_data, tmp_path_factory):
    cfg = tiny_demo_config(tmp_path_factory.mktemp('failures'))
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    return cfg, model


def test_non_finite_router_logits_raise_naming_the_layer(tiny_model):
    cfg, model = tiny_model
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = model.data_preprocessor(pseudo_collate([dataset[0], dataset[9]]), True)
    layer = model.moe_layers['decoder.layers.2.ffn']
    saved = layer.router.gate.weight.detach().clone()
    with torch.no_grad():
        layer.router.gate.weight[0, 0] = float('nan')
    try:
        with pytest.raises(FloatingPointError, match=r'decoder.layers.2.ffn: router logits are '
                                                      r'not finite'):
            model.loss(batch['inputs'], batch['data_samples'])
    finally:
        with torch.no_grad():
            layer.router.gate.weight.copy_(saved)
    assert all(layer.context_targets is None for layer in model.moe_layers.values())


@pytest.mark.slow  # trains or spawns a process
def test_images_without_objects_or_with_only_ignored_objects_train(demo_data, tmp_path):
    import shutil
    root = tmp_path / 'odd'
    (root / 'images').mkdir(parents=True)
    (root / 'labelTxt').mkdir()
    source = osp.join(demo_data, 'aerial', 'train', 'images', 'A0000.png')
    for stem in ('empty', 'ignored'):
        shutil.copy(source, root / 'images' / f'{stem}.png')
    (root / 'labelTxt' / 'empty.txt').write_text('imagesource:x\ngsd:1\n')
    (root / 'labelTxt' / 'ignored.txt').write_text(
        'imagesource:x\ngsd:1\n10 10 60 10 60 50 10 50 plane 1\n90 90 130 90 130 120 90 120 plane 1\n')
    cfg = tiny_demo_config(tmp_path / 'work', max_iters=2)
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
    entry = cfg.train_dataloader.dataset.datasets[1]
    entry.dataset.ann_file = str(root / 'labelTxt')
    entry.dataset.data_prefix = dict(img_path=str(root / 'images'))
    cfg.train_dataloader.dataset.datasets = [entry]  # only the odd images: batch = both
    cfg.model.bbox_head.num_classes = 2  # plane, storage-tank
    runner = Runner.from_cfg(cfg)
    runner.train()
    losses = train_losses(runner)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow  # trains or spawns a process
def test_expert_map_and_number_of_experts_disagree_fails_before_training(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    cfg.model.moe.num_experts = 2  # the demo mixture maps 'signs' to expert 2
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r"dataset 'signs' is mapped to expert 2, but the model "
                                         r"has 2 experts"):
        runner.train()
    assert runner.iter == 0
    assert not osp.exists(osp.join(str(tmp_path), 'iter_1.pth'))
