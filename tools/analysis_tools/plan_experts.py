"""Plan the dataset-to-expert map from the model's own features.

    python tools/analysis_tools/plan_experts.py CONFIG [CHECKPOINT] --num-experts E
        [--images-per-dataset N] [--layer NAME] [--seed S] [--out PLAN.json]
        [--cfg-options ...]

Runs the model (dense, MoE or DAMEX; with or without a checkpoint: without one, the
config's init under ``--seed``, as a training run with that seed starts) over N training
images per dataset, with the test pipeline, and averages the tokens that enter the FFN of
every MoE layer (and of ``--layer``). It clusters the datasets into E experts at ``--layer``
(default: the first MoE layer; for a dense model ``decoder.layers.0.ffn``) with a
size-aware spherical k-means (:func:`damex.models.moe.planning.plan_assignment`: no expert
empty, each expert's share of training tokens capped). It prints the plan (dataset,
expert, share of tokens, nearest other dataset), saves a dataset x dataset cosine
similarity heatmap with the plan drawn on it next to PLAN.json, and writes PLAN.json::

    {"experts": {dataset: expert}, "layer": NAME, "num_experts": E,
     "shares": {dataset: share of training tokens},
     "layers": {layer: {"dataset_means": {dataset: [D floats]},
                        "centroids": [[D floats] per expert],
                        "within_covariance": [[D floats] x D]}}}

(``within_covariance``: the tokens' covariance within datasets, pooled; the router's
plan initialisation uses it to discount the directions tokens vary in.) The assignment is
made from a first pass over the images; each later MoE layer's statistics are then
measured again with the routers before it initialised from the plan, as the model will
be at its first step.

Use it with ``DatasetMixture(expert_plan='PLAN.json')`` and
``DatasetAwareRouter(init_from_plan='PLAN.json')``.
"""
import argparse
import copy
import json
import os.path as osp
import logging
from collections import defaultdict

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import set_random_seed  # noqa: E402
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from mmdet.registry import DATASETS, MODELS  # noqa: E402

import damex  # noqa: F401,E402
from damex.datasets import dataset_probabilities  # noqa: E402
from damex.models.checkpoint_match import describe_mismatch  # noqa: E402
from damex.models.moe.planning import gate_from_plan, plan_assignment  # noqa: E402


def planning_mixture(cfg):
    """The training mixture with the test pipeline (deterministic, no augmentation)."""
    mixture = copy.deepcopy(cfg.train_dataloader.dataset)
    pipeline = cfg.test_dataloader.dataset.get('pipeline')
    if pipeline is None:
        pipeline = cfg.test_dataloader.dataset.datasets[0].dataset.pipeline
    mixture['pipeline'] = pipeline
    for entry in mixture['datasets']:
        entry['dataset'].pop('pipeline', None)
    return DATASETS.build(mixture)


def token_shares(cfg, mixture):
    """Each dataset's share of training tokens: its sampling probability (equal tokens per
    image in the decoder)."""
    sampler = cfg.train_dataloader.get('sampler') or {}
    sizes = mixture.dataset_sizes()
    if sampler.get('type') == 'MixtureSampler':
        return [float(p) for p in dataset_probabilities(
            sizes, sampler.get('policy', 'proportional'), sampler.get('temperature', 1.0))]
    return [s / sum(sizes) for s in sizes]


@torch.no_grad()
def dataset_means(model, mixture, layer_names, images_per_dataset, seed):
    """{layer: {dataset: mean token}} over ``images_per_dataset`` images of each dataset,
    and {layer: pooled within-dataset token covariance}."""
    captured = {}
    handles = []
    for name in layer_names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, name=name: captured.__setitem__(name, args[0][0].double())))
    rng = np.random.default_rng(seed)
    tokens = defaultdict(lambda: defaultdict(list))
    offsets = np.cumsum([0] + mixture.dataset_sizes())
    picks = []
    for d, entry in enumerate(mixture.label_space.datasets):
        size = offsets[d + 1] - offsets[d]
        chosen = rng.choice(size, size=min(images_per_dataset, size), replace=False)
        picks += [(entry.name, int(offsets[d] + i)) for i in sorted(chosen)]
    progress = ProgressBar(len(picks))
    try:
        for dataset, index in picks:
            data = model.data_preprocessor(pseudo_collate([mixture[index]]), False)
            for sample in data['data_samples']:  # the mixture's current expert map is moot
                if 'expert_id' in sample:
                    delattr(sample, 'expert_id')
            # the transformer alone: the tokens are all we need, not the head's predictions
            model.forward_transformer(model.extract_feat(data['inputs']),
                                      data['data_samples'])
            for name in layer_names:
                tokens[name][dataset].append(captured[name].cpu())
            progress.update()
    finally:
        for handle in handles:
            handle.remove()
    print()
    means, covariances = {}, {}
    for name in layer_names:
        means[name], residuals = {}, []
        for dataset, per_image in tokens[name].items():
            # the mean of image means (equal tokens per image): each image counts once
            means[name][dataset] = torch.stack([t.mean(0) for t in per_image]).mean(0)
            residuals.append(torch.cat(per_image) - means[name][dataset])
        residuals = torch.cat(residuals)
        covariances[name] = (residuals.T @ residuals / len(residuals)).numpy()
        means[name] = {d: m.numpy() for d, m in means[name].items()}
    return means, covariances


def refine_for_plan_init(model, mixture, moe_layers, means, covariances, experts, args):
    """Recompute each MoE layer's statistics with the routers before it initialised from
    the plan, as the model will be at its first step (a router's choice changes what the
    later layers see). One pass over the images per MoE layer after the first."""
    routers = [model.get_submodule(n).router for n in moe_layers]
    if not moe_layers or any(getattr(r, 'num_experts', None) != args.num_experts or
                             not hasattr(r, 'gate') for r in routers):
        return means, covariances
    for index, (name, router) in enumerate(zip(moe_layers, routers)):
        with torch.no_grad():
            router.gate.weight.copy_(gate_from_plan(
                {d: m.tolist() for d, m in means[name].items()}, experts, args.num_experts,
                covariance=covariances[name].tolist()))
        later = moe_layers[index + 1:]
        if later:
            print(f'statistics of {", ".join(later)} with the routers up to {name} '
                  'initialised from the plan')
            new_means, new_covariances = dataset_means(model, mixture, later,
                                                       args.images_per_dataset, args.seed)
            means.update(new_means)
            covariances.update(new_covariances)
    return means, covariances


def save_heatmap(names, means, experts, path, layer):
    order = sorted(range(len(names)), key=lambda i: (experts[names[i]], i))
    unit = np.stack([means[names[i]] / np.linalg.norm(means[names[i]]) for i in order])
    similarity = unit @ unit.T
    size = max(4.0, 0.6 * len(names) + 2)
    fig = Figure(figsize=(size + 1, size))  # no pyplot: no backend, no global state
    ax = fig.subplots()
    image = ax.imshow(similarity, cmap='viridis')
    labels = [f'{names[i]} (e{experts[names[i]]})' for i in order]
    ax.set_xticks(range(len(order)), labels, rotation=45, ha='right')
    ax.set_yticks(range(len(order)), labels)
    start = 0
    for expert in sorted(set(experts.values())):
        count = sum(1 for i in order if experts[names[i]] == expert)
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), count, count, fill=False,
                               edgecolor='red', linewidth=2))
        start += count
    ax.set_title(f'cosine similarity of dataset mean tokens, {layer}\n(red: one expert)')
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?')
    parser.add_argument('--num-experts', type=int, required=True)
    parser.add_argument('--images-per-dataset', type=int, default=16)
    parser.add_argument('--layer', help='MoE (or dense FFN) layer the plan is computed at')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='PLAN.json')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # no per-parameter init log
    set_random_seed(args.seed)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.get('backbone', {}).pop('init_cfg', None) if args.checkpoint else None
    model = MODELS.build(model_cfg)
    if args.checkpoint:
        checkpoint = _load_checkpoint(args.checkpoint, map_location='cpu')
        problem = describe_mismatch(model, checkpoint.get('state_dict', checkpoint))
        if problem:  # a partly random model would plan from random features
            raise SystemExit(f'error: {args.checkpoint} does not fit {args.config}: {problem}')
        _load_checkpoint_to_model(model, checkpoint)
    else:
        model.init_weights()
    model.eval()
    moe_layers = list(getattr(model, 'moe_layers', {}))
    layer = args.layer or (moe_layers[0] if moe_layers else 'decoder.layers.0.ffn')
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise SystemExit(f'error: the model has no layer {layer!r}; MoE layers: {moe_layers}')
    layer_names = list(dict.fromkeys([layer] + moe_layers))

    mixture = planning_mixture(cfg)
    names = list(mixture.label_space.names)
    shares = token_shares(cfg, mixture)
    means, covariances = dataset_means(model, mixture, layer_names, args.images_per_dataset,
                                       args.seed)
    assignment, cost = plan_assignment(np.stack([means[layer][n] for n in names]), shares,
                                       args.num_experts, seed=args.seed)
    experts = dict(zip(names, assignment))

    unit = np.stack([means[layer][n] / np.linalg.norm(means[layer][n]) for n in names])
    similarity = unit @ unit.T
    print(f'plan at {layer} ({args.num_experts} experts, cost {cost:.4f}):')
    print(f'  {"dataset":<18}{"expert":>7}{"share":>8}  nearest other dataset')
    for i, name in enumerate(names):
        others = [j for j in range(len(names)) if j != i]
        nearest = max(others, key=lambda j: similarity[i, j]) if others else None
        near = f'{names[nearest]} ({similarity[i, nearest]:.3f})' if nearest is not None else '-'
        print(f'  {name:<18}{experts[name]:>7}{shares[i]:>8.3f}  {near}')

    means, covariances = refine_for_plan_init(model, mixture, moe_layers, means, covariances,
                                              experts, args)
    layers = {}
    for name in layer_names:
        centroids = []
        for e in range(args.num_experts):
            members = [i for i, n in enumerate(names) if experts[n] == e]
            weights = np.array([shares[i] for i in members])
            centroid = (sum(w * means[name][names[i]] for w, i in zip(weights, members))
                        / weights.sum()) if members else np.zeros_like(means[name][names[0]])
            centroids.append(centroid.tolist())
        layers[name] = dict(dataset_means={n: means[name][n].tolist() for n in names},
                            centroids=centroids,
                            within_covariance=np.round(covariances[name], 6).tolist())
    plan = dict(experts=experts, layer=layer, num_experts=args.num_experts,
                shares=dict(zip(names, shares)), layers=layers)
    with open(args.out, 'w') as f:
        json.dump(plan, f)
    heatmap = osp.splitext(args.out)[0] + '_similarity.png'
    save_heatmap(names, means[layer], experts, heatmap, layer)
    print(f'wrote {args.out} and {heatmap}')


if __name__ == '__main__':
    main()
