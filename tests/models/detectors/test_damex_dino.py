"""DAMEX-DINO: configs build, MoE placement, a training step on a mixed batch, predict,
checkpoints, initialisation and dense-checkpoint upcycling."""
import copy
import glob
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner, load_checkpoint

from mmdet.registry import DATASETS, MODELS
from damex.models.moe import MoEFFN

from damex.testing import REPO, tiny_demo_config

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '*', '*.py')))


def ffn_params(layer):
    return sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize('config', [c for c in CONFIGS if '_base_' not in c],
                         ids=lambda c: osp.relpath(c, REPO))
def test_every_config_builds_with_moe_exactly_where_configured(config):
    cfg = Config.fromfile(config)
    model = MODELS.build(copy.deepcopy(cfg.model))
    moe = cfg.model.get('moe')
    placed = sorted(model.moe_layers)
    if moe is None:
        assert placed == []
        return
    expected = sorted([f'encoder.layers.{i}.ffn' for i in moe.get('encoder_layers', [])] +
                      [f'decoder.layers.{i}.ffn' for i in moe.get('decoder_layers', [0, 2, 4])])
    assert placed == expected
    dense_cfg = copy.deepcopy(cfg.model)
    dense_cfg.moe = None
    dense = MODELS.build(dense_cfg)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in dense.parameters())
    num_experts = moe['num_experts']
    per_layer = [(num_experts - 1) * ffn_params(dense.get_submodule(name))
                 + ffn_params(model.get_submodule(name).router) for name in placed]
    assert extra == sum(per_layer)


def test_moe_in_encoder_layers_too():
    cfg = Config.fromfile(osp.join(REPO, 'configs/demo/damex_demo.py'))
    cfg.model.moe.encoder_layers = [1]
    model = MODELS.build(copy.deepcopy(cfg.model))
    assert 'encoder.layers.1.ffn' in model.moe_layers
    cfg.model.moe.decoder_layers = [6]
    with pytest.raises(ValueError, match='decoder_layers: layer 6 does not exist'):
        MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def tiny(demo_data, tmp_path_factory):
    cfg = tiny_demo_config(tmp_path_factory.mktemp('tiny'))
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    train_set = DATASETS.build(cfg.train_dataloader.dataset)
    return cfg, model, train_set


def mixed_batch(model, dataset, indices, training=True):
    data = pseudo_collate([dataset[i] for i in indices])
    return model.data_preprocessor(data, training)


def test_training_step_on_a_mixed_batch(tiny):
    cfg, model, dataset = tiny
    sizes = dataset.dataset_sizes()
    trees, signs = 0, sizes[0] + sizes[1]  # first image of dataset 0 and of dataset 2
    model.train()
    for order in ([trees, signs], [signs, trees]):
        batch = mixed_batch(model, dataset, order)
        expected = [s.expert_id for s in batch['data_samples']]
        assert sorted(expected) == [0, 2]
        losses = model.loss(batch['inputs'], batch['data_samples'])
        for layer in model.moe_layers.values():
            # routing targets reach every layer in batch order ...
            assert layer.last_routing.targets.tolist() == expected
            # ... and the DAMEX loss is each image's tokens against its own expert
            logits = layer.last_routing.logits
            per_token = torch.tensor(expected).repeat_interleave(logits.shape[1])
            reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                          per_token)
            assert layer.aux_losses['damex'].item() == pytest.approx(reference.item(), rel=1e-5)
            assert layer.context_targets is None  # cleared after the forward
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert 'loss_damex' in losses
    model.zero_grad()
    total.backward()
    for name, layer in model.moe_layers.items():
        assert layer.router.gate.weight.grad.abs().sum() > 0, name
        assert layer.experts.fc1_weight.grad.abs().sum() > 0, name


def test_predict_needs_no_dataset_information(tiny):
    cfg, model, dataset = tiny
    model.eval()
    batch = mixed_batch(model, dataset, [0, 9], training=False)
    for sample in batch['data_samples']:
        for key in ('dataset_id', 'dataset_name', 'expert_id', 'label_map'):
            sample.metainfo.pop(key, None)
            if key in sample:
                delattr(sample, key)
    with torch.no_grad():
        results = model.predict(batch['inputs'], batch['data_samples'])
    assert len(results) == 2 and len(results[0].pred_instances) == cfg.model.test_cfg.max_per_img
    assert results[0].routing_counts.shape == (3, 3)  # 3 MoE layers x 3 experts
    assert all(layer.last_routing.targets is None for layer in model.moe_layers.values())


def test_experts_initialised_per_expert_after_dino_init(tiny):
    _, model, _ = tiny
    for layer in model.moe_layers.values():
        weight = layer.experts.fc1_weight.detach()  # (E, out, in)
        out_features, in_features = weight.shape[1:]
        bound = math.sqrt(6.0 / (in_features + out_features))
        assert weight.abs().max() <= bound
        # xavier-uniform per expert: std = bound / sqrt(3); DINO's xavier on the stacked
        # (E, out, in) tensor would give a far smaller one
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert not torch.equal(weight[0], weight[1])


def test_dense_checkpoint_upcycles_into_every_expert(tiny):
    cfg, model, _ = tiny
    dense_cfg = copy.deepcopy(cfg.model)
    dense_cfg.moe = None
    dense = MODELS.build(dense_cfg)
    dense.init_weights()
    missing = model.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == sorted(f'{n}.router.gate.weight' for n in model.moe_layers)
    assert not missing.unexpected_keys
    for name, layer in model.moe_layers.items():
        fc1 = dense.get_submodule(name).layers[0][0].weight
        for e in range(layer.num_experts):
            assert torch.equal(layer.experts.fc1_weight[e], fc1)


@pytest.mark.slow  # trains or spawns a process
def test_runner_checkpoint_loads_back_and_predicts_the_same_boxes(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.eval()
    dataset = runner.test_dataloader.dataset
    batch = mixed_batch(model, dataset, [1, 20], training=False)
    with torch.no_grad():
        expected = model.predict(batch['inputs'], copy.deepcopy(batch['data_samples']))
    rebuilt = MODELS.build(copy.deepcopy(cfg.model)).eval()
    load_checkpoint(rebuilt, str(tmp_path / 'iter_1.pth'), map_location='cpu')
    with torch.no_grad():
        got = rebuilt.predict(batch['inputs'], copy.deepcopy(batch['data_samples']))
    for a, b in zip(expected, got):
        torch.testing.assert_close(a.pred_instances.bboxes, b.pred_instances.bboxes)
        torch.testing.assert_close(a.pred_instances.scores, b.pred_instances.scores)


def test_one_training_step_under_cpu_autocast(tiny):
    """Mixed precision (issue #14): a training step of the smallest config under bf16
    autocast; MoE experts in bf16, router logits and losses float32."""
    cfg, model, dataset = tiny
    model.train()
    batch = mixed_batch(model, dataset, [0, 9])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model.loss(batch['inputs'], batch['data_samples'])
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    model.zero_grad()
    total.backward()
    for name, layer in model.moe_layers.items():
        assert layer.last_routing.logits.dtype == torch.float32
        assert layer.aux_losses['damex'].dtype == torch.float32
        grad = layer.experts.fc1_weight.grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_dataset_scoped_generator_is_built_as_such_with_the_plain_init(tmp_path):
    # issue #20: no class patching; the scoped generator has the state a plain one would,
    # and the random stream after it is the same, so every other parameter is too
    from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator

    from damex.models.layers import DatasetScopedCdnQueryGenerator
    cfg = tiny_demo_config(tmp_path)
    models = {}
    for scope in ('dataset', 'all'):
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.bbox_head.loss_scope = scope
        model_cfg.backbone.init_cfg = None  # nothing to download
        torch.manual_seed(0)
        models[scope] = MODELS.build(model_cfg)
        models[scope].init_weights()  # (level_embed is uninitialised memory before)
    scoped, plain = models['dataset'].dn_query_generator, models['all'].dn_query_generator
    assert type(scoped) is DatasetScopedCdnQueryGenerator and type(plain) is CdnQueryGenerator
    scoped_state, plain_state = models['dataset'].state_dict(), models['all'].state_dict()
    assert scoped_state.keys() == plain_state.keys()
    for key, value in scoped_state.items():
        assert torch.equal(value, plain_state[key]), key
