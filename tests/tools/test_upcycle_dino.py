"""Warm start from a dense DINO checkpoint (issue #14.2): tools/model_converters/upcycle_dino.py."""
import copy
import random
import sys

import pytest
import torch

from mmdet.datasets import CocoDataset
from mmdet.registry import MODELS

from damex.testing import REPO, load_tool, tiny_demo_config

COCO = list(CocoDataset.METAINFO['classes'])


@pytest.fixture(scope='module')
def tool():
    return load_tool('tools/model_converters/upcycle_dino.py')


def dense_source(tmp_path, cfg):
    """A stock mmdet DINO (80 COCO classes, random weights) saved as mmdet saves it."""
    dense_cfg = copy.deepcopy(cfg.model)
    dense_cfg.type = 'DINO'
    dense_cfg.pop('moe')
    dense_cfg.bbox_head = dict(dense_cfg.bbox_head, type='DINOHead', num_classes=80)
    dense_cfg.bbox_head.pop('loss_scope', None)
    torch.manual_seed(1)
    model = MODELS.build(dense_cfg)
    model.init_weights()
    path = tmp_path / 'dense.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(classes=COCO))),
               path)
    return model.eval(), path


def target_config(tmp_path, num_experts, classes, **moe):
    cfg = tiny_demo_config(tmp_path / 'work', num_experts=num_experts, **moe)
    cfg.model.backbone.init_cfg = None
    cfg.model.bbox_head.num_classes = len(classes)
    cfg.train_dataloader.dataset = dict(
        type='DatasetMixture', num_experts=num_experts, datasets=[dict(
            name='coco', expert=0, dataset=dict(type='CocoDataset', ann_file='nowhere.json',
                                                metainfo=dict(classes=tuple(classes)),
                                                pipeline=[]))])
    path = tmp_path / f'target_{num_experts}.py'
    cfg.dump(str(path))
    return cfg, path


def convert(tool, monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['upcycle_dino.py', *map(str, args)])
    tool.main()


@pytest.mark.parametrize('num_experts, moe', [
    (1, {}),  # one expert: gate 1, the expert is the dense FFN
    (3, dict(shared_expert=dict(feedforward_channels=512))),  # shared = dense, experts' fc2 0
])
def test_converted_model_computes_what_the_dense_model_computes(tool, tmp_path, monkeypatch,
                                                                demo_data, capsys, num_experts,
                                                                moe):
    shuffled = COCO[:]
    random.Random(0).shuffle(shuffled)  # the unified order differs from the source's
    cfg, config = target_config(tmp_path, num_experts, shuffled, **moe)
    dense, source = dense_source(tmp_path, cfg)
    convert(tool, monkeypatch, source, config, tmp_path / 'out.pth')
    assert 'coco' in capsys.readouterr().out
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.load_state_dict(torch.load(tmp_path / 'out.pth')['state_dict'], strict=True)
    model.eval()
    bench = load_tool('tools/benchmark_detector.py')
    inputs, samples = bench.synthetic_batch(128, 1, 80, num_experts)
    with torch.no_grad():
        dense_cls, dense_box = dense(inputs, copy.deepcopy(samples), mode='tensor')
        moe_cls, moe_box = model(inputs, copy.deepcopy(samples), mode='tensor')
    rows = [COCO.index(name) for name in shuffled]
    torch.testing.assert_close(moe_box, dense_box, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe_cls, dense_cls[..., rows], rtol=1e-5, atol=1e-5)
    assert len(model.moe_layers) == 3


def test_experts_and_class_rows_come_from_the_source(tool, tmp_path, monkeypatch, demo_data):
    # VOC-style names: the class map carries aeroplane / sofa to COCO's names
    classes = ('aeroplane', 'Person', 'sofa', 'tree-stump')
    cfg, config = target_config(tmp_path, 3, classes)
    dense, source = dense_source(tmp_path, cfg)
    convert(tool, monkeypatch, source, config, tmp_path / 'out.pth', '--class-map',
            f'{REPO}/configs/_base_/class_maps/voc_to_coco.json')
    state = torch.load(tmp_path / 'out.pth')['state_dict']
    dense_state = dense.state_dict()
    for layer in ('decoder.layers.0.ffn', 'decoder.layers.2.ffn', 'decoder.layers.4.ffn'):
        for e in range(3):
            assert torch.equal(state[f'{layer}.experts.fc1_weight'][e],
                               dense_state[f'{layer}.layers.0.0.weight'])
            assert torch.equal(state[f'{layer}.experts.fc2_bias'][e],
                               dense_state[f'{layer}.layers.1.bias'])
    fresh = MODELS.build(copy.deepcopy(cfg.model))
    fresh.init_weights()
    matched = {0: COCO.index('airplane'), 1: COCO.index('person'), 2: COCO.index('couch')}
    class_keys = [f'bbox_head.cls_branches.{i}.{p}' for i in range(7) for p in ('weight', 'bias')]
    for key in class_keys + ['dn_query_generator.label_embedding.weight']:
        for unified, row in matched.items():
            assert torch.equal(state[key][unified], dense_state[key][row]), key
        if key.endswith('bias'):  # the unmatched class keeps the focal-loss prior
            assert state[key][3] == pytest.approx(fresh.state_dict()[key][3].item())
    assert torch.load(tmp_path / 'out.pth')['meta']['dataset_meta']['classes'] == classes


def test_unknown_source_key_is_an_error(tool, tmp_path, monkeypatch, demo_data):
    cfg, config = target_config(tmp_path, 2, COCO)
    _, source = dense_source(tmp_path, cfg)
    checkpoint = torch.load(source)
    checkpoint['state_dict']['neck.extra_adapter.weight'] = torch.zeros(3)
    torch.save(checkpoint, source)
    with pytest.raises(ValueError, match='source key neck.extra_adapter.weight'):
        convert(tool, monkeypatch, source, config, tmp_path / 'out.pth')
