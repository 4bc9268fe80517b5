"""Routing telemetry in training logs, and staged routing (ForcedRoutingHook)."""
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

from damex.models.moe.telemetry import routing_telemetry
from damex.models.moe import MoEFFN, RoutingSummary

from damex.testing import tiny_demo_config


def test_telemetry_by_hand_on_a_fixed_routing():
    # 2 images x 3 tokens, 2 experts, top-1; image 0 -> target 1, image 1 -> target 0
    logits = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [3.0, 0.0]],
                           [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    expert_index = torch.tensor([[[1], [1], [0]], [[0], [-1], [0]]])  # one choice dropped
    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    for b in range(2):
        for n in range(3):
            if expert_index[b, n, 0] >= 0:
                mask[b, n, expert_index[b, n, 0]] = True
    stats = routing_telemetry(RoutingSummary(family='token_choice', logits=logits,
                                             dispatch_mask=mask, expert_index=expert_index,
                                             targets=torch.tensor([1, 0])),
                              dataset_ids=torch.tensor([4, 7]))
    # image 0: 2 of 3 tokens at expert 1; image 1: 2 of 3 at expert 0 -> mean 2/3
    assert stats['train_accuracy'].item() == pytest.approx(2 / 3)
    assert stats['drop_rate'].item() == pytest.approx(1 / 6)
    # loads: expert 0 takes 3, expert 1 takes 2 -> max / mean = 3 / 2.5
    assert stats['load_max_over_mean'].item() == pytest.approx(1.2)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats['entropy'].item() == pytest.approx(entropy.item(), rel=1e-6)


@pytest.mark.slow  # trains or spawns a process
def test_telemetry_keys_in_scalars_json(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    # a visualizer of its own: mmengine reuses an instance of the same name (and its dir)
    cfg.visualizer = dict(cfg.visualizer, name=f'visualizer_{tmp_path.name}')
    runner = Runner.from_cfg(cfg)
    runner.train()
    scalars = glob.glob(osp.join(str(tmp_path), '*', 'vis_data', 'scalars.json'))
    rows = [json.loads(line) for line in open(scalars[0])]
    assert len(rows) == 2
    layers = ('decoder.layers.0.ffn', 'decoder.layers.2.ffn', 'decoder.layers.4.ffn')
    for row in rows:
        for stat in ('train_accuracy', 'load_max_over_mean', 'drop_rate', 'entropy'):
            values = [row[f'routing/{layer}/{stat}'] for layer in layers]
            assert row[f'routing/{stat}'] == pytest.approx(sum(values) / 3, rel=1e-5)
        assert 0 <= row['routing/train_accuracy'] <= 1
        assert 1 <= row['routing/load_max_over_mean'] <= 3
        assert row['routing/drop_rate'] == 0  # no capacity in the demo
        assert 0 <= row['routing/entropy'] <= torch.log(torch.tensor(3.0)).item() + 1e-6


def forced_fraction(runner):
    """Share of tokens routed to their target in each MoE layer's last forward."""
    model = runner.model
    shares = []
    for layer in model.moe_layers.values():
        routing = layer.last_routing
        chosen = routing.expert_index[..., 0]
        shares.append((chosen == routing.targets[:, None]).float().mean().item())
    return min(shares)


class RecordForcing(Hook):
    """A hook recording, after every iteration, whether all tokens went to their targets."""

    def __init__(self):
        self.record = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.record.append((runner.iter, forced_fraction(runner)))


def train_with_forcing(work_dir, max_iters, resume=False):
    cfg = tiny_demo_config(work_dir, max_iters=max_iters)
    cfg.model.moe.router = dict(type='DatasetAwareRouter', noise_std=1.0)
    cfg.custom_hooks.append(dict(type='ForcedRoutingHook', iters=2))
    cfg.resume = resume
    cfg.default_hooks.checkpoint.interval = 1
    runner = Runner.from_cfg(cfg)
    recorder = RecordForcing()
    runner.register_hook(recorder, priority='LOWEST')
    runner.train()
    return runner, recorder.record


@pytest.mark.slow  # trains or spawns a process
def test_forced_routing_for_the_first_iterations_then_the_router(demo_data, tmp_path):
    runner, record = train_with_forcing(tmp_path, 4)
    assert [r[1] == 1.0 for r in record[:2]] == [True, True]  # iterations 0 and 1
    assert all(share < 1.0 for _, share in record[2:])  # the untrained router decides
    assert all(not layer.force_targets for layer in runner.model.moe_layers.values())


@pytest.mark.slow  # trains or spawns a process
def test_forced_routing_across_a_resume(demo_data, tmp_path):
    train_with_forcing(tmp_path, 1)  # iteration 0, checkpoint iter_1
    _, record = train_with_forcing(tmp_path, 3, resume=True)  # iterations 1 and 2
    assert [it for it, _ in record] == [1, 2]  # the iterations this run trained
    assert record[0][1] == 1.0 and record[1][1] < 1.0


def test_layer_forcing_keeps_the_router_loss():
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=3,
                   router=dict(type='DatasetAwareRouter')).train()
    layer.force_targets = True
    x = torch.randn(2, 5, 8)
    out = layer(x, routing_targets=torch.tensor([2, 1]))
    assert layer.last_routing.expert_index[..., 0].tolist() == [[2] * 5, [1] * 5]
    (out.sum() + layer.aux_losses['damex']).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    layer.eval()
    layer(x)  # inference: the router decides, no targets needed
    assert layer.last_routing.targets is None
