"""Expert planning: the assignment, the plan tool, the plan-initialised router, expert_plan=."""
import copy
import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.runner import set_random_seed

from mmdet.registry import DATASETS, MODELS
from damex.models.moe.planning import gate_from_plan, plan_assignment

from damex.testing import REPO, tiny_demo_config


def test_assignment_groups_similar_datasets_and_leaves_no_expert_empty():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 32))
    means = np.stack([a + 0.05 * rng.normal(size=32), a + 0.05 * rng.normal(size=32),
                      b + 0.05 * rng.normal(size=32), b + 0.05 * rng.normal(size=32), c])
    shares = [0.2] * 5
    assignment, _ = plan_assignment(means, shares, 3, seed=0)
    assert assignment[0] == assignment[1] and assignment[2] == assignment[3]
    assert len(set(assignment)) == 3
    assert plan_assignment(means, shares, 3, seed=0) == plan_assignment(means, shares, 3, seed=0)
    # five datasets, five experts: each its own; fewer experts: none stays empty
    assert sorted(plan_assignment(means, shares, 5)[0]) == [0, 1, 2, 3, 4]
    assert len(set(plan_assignment(means, shares, 4, seed=1)[0])) == 4
    # the load cap: one huge group cannot take everything
    assignment, _ = plan_assignment(np.stack([a] * 4 + [b]), [0.24] * 4 + [0.04], 2, seed=0)
    loads = [sum(0.24 if d < 4 else 0.04 for d, e in enumerate(assignment) if e == x)
             for x in range(2)]
    assert max(loads) <= max(1.5 / 2, 0.24) + 1e-9


def test_gate_sends_each_mean_to_its_expert_confidently():
    rng = np.random.default_rng(1)
    means = {f'd{i}': rng.normal(size=16).tolist() for i in range(4)}
    experts = {'d0': 0, 'd1': 2, 'd2': 1, 'd3': 2}
    tokens = np.concatenate([np.asarray(m) + 0.3 * rng.normal(size=(200, 16))
                             for m in means.values()])
    residual = tokens - np.repeat(np.stack(list(means.values())), 200, axis=0)
    for covariance in (None, (residual.T @ residual / len(residual)).tolist()):
        weight = gate_from_plan(means, experts, 3, covariance=covariance)
        probs = (torch.tensor(list(means.values()), dtype=torch.float32) @ weight.T).softmax(-1)
        assert probs.argmax(-1).tolist() == [0, 2, 1, 2]
        assert probs.max(-1).values.min() > 0.9
    with pytest.raises(KeyError, match=r"no expert for \['d3'\]"):
        gate_from_plan(means, {'d0': 0, 'd1': 1, 'd2': 1}, 3)


def write_config(tmp_path, datasets=None):
    """The tests' small demo config, optionally with other training datasets, as a file."""
    cfg = tiny_demo_config(tmp_path / 'work')
    if datasets is not None:
        cfg.train_dataloader.dataset.datasets = datasets(cfg.train_dataloader.dataset.datasets)
        cfg.train_dataloader.dataset.num_experts = None
    config = tmp_path / 'cfg.py'
    cfg.dump(str(config))
    return config


def run_plan(config, out, *args):
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools/analysis_tools/plan_experts.py'),
                             str(config), '--out', str(out), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.load(open(out)), result.stdout


@pytest.mark.slow  # trains or spawns a process
def test_plan_tool_puts_same_domain_datasets_together(demo_data, tmp_path):
    # aerial and aerial-copy: the same images; signs and signs-stop: the same images with
    # another label space; trees: another domain
    def datasets(entries):
        by_name = {e['name']: e['dataset'] for e in entries}
        stop = copy.deepcopy(by_name['signs'])
        stop.update(metainfo=dict(classes=('stop', )), ignore_classes=('yield', ))
        return [dict(name='trees', dataset=by_name['trees']),
                dict(name='aerial', dataset=by_name['aerial']),
                dict(name='aerial-copy', dataset=copy.deepcopy(by_name['aerial'])),
                dict(name='signs', dataset=by_name['signs']),
                dict(name='signs-stop', dataset=stop)]

    config = write_config(tmp_path, datasets)
    plan, stdout = run_plan(config, tmp_path / 'plan.json', '--num-experts', 3,
                            '--images-per-dataset', 2)
    experts = plan['experts']
    assert experts['aerial'] == experts['aerial-copy'] and experts['signs'] == experts['signs-stop']
    assert len(set(experts.values())) == 3  # no expert empty: trees alone
    assert plan['layer'] == 'decoder.layers.0.ffn'
    assert set(plan['layers']) == {'decoder.layers.0.ffn', 'decoder.layers.2.ffn',
                                   'decoder.layers.4.ffn'}
    for entry in plan['layers'].values():
        assert set(entry['dataset_means']) == set(experts)
        assert len(entry['centroids']) == 3 and len(entry['centroids'][0]) == 256
    assert 'nearest other dataset' in stdout
    assert osp.getsize(tmp_path / 'plan_similarity.png') > 1000
    # deterministic for a seed
    again, _ = run_plan(config, tmp_path / 'again.json', '--num-experts', 3,
                        '--images-per-dataset', 2)
    assert again['experts'] == experts


@pytest.mark.slow  # trains or spawns a process
def test_plan_initialised_router_routes_right_at_step_0(demo_data, tmp_path):
    config = write_config(tmp_path)
    plan_file = tmp_path / 'plan.json'
    plan, _ = run_plan(config, plan_file, '--num-experts', 3, '--images-per-dataset', 6)
    cfg = tiny_demo_config(tmp_path / 'work')
    cfg.model.moe.router = dict(type='DatasetAwareRouter', noise_std=1.0,
                                init_from_plan=str(plan_file))
    cfg.train_dataloader.dataset.expert_plan = str(plan_file)
    for entry in cfg.train_dataloader.dataset.datasets:
        entry.pop('expert')
    set_random_seed(0)  # as the plan tool and a training run with seed 0 build the model
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    model.eval()
    train = copy.deepcopy(cfg.train_dataloader.dataset)
    train.pipeline = cfg.test_dataloader.dataset.pipeline  # no flip: the training images
    mixture = DATASETS.build(train)
    accuracy = {name: [] for name in model.moe_layers}
    for index in range(len(mixture)):
        sample = mixture[index]
        with torch.no_grad():
            model.test_step(pseudo_collate([sample]))
        target = sample['data_samples'].expert_id
        for name, layer in model.moe_layers.items():
            accuracy[name].append((layer.last_routing.expert_index[..., 0] == target)
                                  .float().mean().item())
    mean = {name: float(np.mean(values)) for name, values in accuracy.items()}
    assert mean[plan['layer']] >= 0.9, mean
    print('routing accuracy at step 0 per layer:', mean)


def test_expert_plan_equals_explicit_experts(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path)
    plan_file = tmp_path / 'plan.json'
    plan_file.write_text(json.dumps(dict(experts=dict(trees=2, aerial=0, signs=2))))
    planned = copy.deepcopy(cfg.train_dataloader.dataset)
    planned.expert_plan = str(plan_file)
    explicit = copy.deepcopy(cfg.train_dataloader.dataset)
    for entry in planned.datasets:
        entry.pop('expert')
    for entry, expert in zip(explicit.datasets, (2, 0, 2)):
        entry.expert = expert
    a, b = DATASETS.build(planned), DATASETS.build(explicit)
    assert a.metainfo['label_space'] == b.metainfo['label_space']
    assert a[0]['data_samples'].expert_id == b[0]['data_samples'].expert_id == 2
    # an explicit expert wins; a dataset missing from the plan is an error naming it
    planned.datasets[0].expert = 1
    assert DATASETS.build(planned).label_space.experts == (1, 0, 2)
    plan_file.write_text(json.dumps(dict(experts=dict(trees=2, aerial=0))))
    planned.datasets[0].pop('expert')
    with pytest.raises(ValueError, match=r"dataset 'signs' is not in the expert plan"):
        DATASETS.build(planned)
