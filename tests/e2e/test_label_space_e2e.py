"""The model carries its label space (issue #11.1): a checkpoint tested on the full demo
mixture, on a mixture of only 'signs' and on the three datasets in reverse order gives the
same predictions (boxes, scores, class names) and the same per-dataset metrics."""
import copy

import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.runner import Runner, load_checkpoint

from mmdet.registry import DATASETS, MODELS
from damex.evaluation import PerDatasetCocoMetric

from damex.testing import tiny_demo_config

pytestmark = pytest.mark.slow


def evaluate(model, mixture_cfg):
    """Predictions {(dataset, image): (boxes, scores, class names)} and the metrics."""
    dataset = DATASETS.build(copy.deepcopy(mixture_cfg))
    loader = Runner.build_dataloader(dict(
        batch_size=1, num_workers=0, dataset=dataset,
        sampler=dict(type='DefaultSampler', shuffle=False)))
    evaluator = Evaluator(PerDatasetCocoMetric(save_heatmaps=False))
    evaluator.dataset_meta = dataset.metainfo
    classes = dataset.metainfo['classes']
    predictions = {}
    for batch in loader:
        with torch.no_grad():
            outputs = model.test_step(batch)
        for sample in outputs:
            pred = sample.pred_instances
            predictions[(sample.dataset_name, sample.img_path)] = (
                pred.bboxes, pred.scores, [classes[label] for label in pred.labels.tolist()])
        evaluator.process(outputs, batch)
    return predictions, evaluator.evaluate(len(dataset))


def test_subset_and_reordered_test_mixtures_give_the_same_results(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=3)
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    model = MODELS.build(copy.deepcopy(cfg.model))
    load_checkpoint(model, str(tmp_path / 'iter_3.pth'), map_location='cpu')
    model.eval()
    assert model.label_space.names == ('trees', 'aerial', 'signs')  # from the checkpoint

    full = cfg.test_dataloader.dataset
    signs_only = copy.deepcopy(full)
    signs_only.datasets = [d for d in full.datasets if d.name == 'signs']
    reverse = copy.deepcopy(full)
    reverse.datasets = list(reversed(full.datasets))
    for entry in reverse.datasets:
        entry.pop('expert')  # experts by position: signs 0, trees 2; the model keeps its own
    results = {name: evaluate(model, mixture) for name, mixture in
               (('full', full), ('signs', signs_only), ('reverse', reverse))}

    full_preds, full_metrics = results['full']
    for name in ('signs', 'reverse'):
        preds, metrics = results[name]
        assert preds and set(preds) <= set(full_preds)
        for key, (boxes, scores, class_names) in preds.items():
            ref_boxes, ref_scores, ref_names = full_preds[key]
            torch.testing.assert_close(boxes, ref_boxes, rtol=0, atol=0)
            torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
            assert class_names == ref_names, key
        datasets = {key[0] for key in preds}
        for key, value in metrics.items():
            if key.split('/')[0] in datasets or key.startswith('routing/decoder'):
                if key.startswith('routing/decoder') and name == 'signs':
                    continue  # per-layer routing averages over the datasets present
                assert value == pytest.approx(full_metrics[key], abs=1e-12), (name, key)
    assert {k[0] for k in results['signs'][0]} == {'signs'}
    for dataset in ('trees', 'aerial', 'signs'):
        assert results['reverse'][1][f'routing/{dataset}/accuracy'] == pytest.approx(
            full_metrics[f'routing/{dataset}/accuracy'])
    assert results['signs'][1]['routing/signs/accuracy'] == pytest.approx(
        full_metrics['routing/signs/accuracy'])
    # every predicted class of a signs image is a sign class, in every mixture
    for preds, _ in results.values():
        for (dataset, _), (_, _, names) in preds.items():
            if dataset == 'signs':
                assert set(names) <= {'stop', 'yield'}

    # A checkpoint of damex <= 0.1 kept the label space in the head: it still loads, with
    # mmengine's loader and torch's, and predicts identically.
    checkpoint = torch.load(tmp_path / 'iter_3.pth', map_location='cpu', weights_only=False)
    state = checkpoint['state_dict']
    state['bbox_head.label_space_bytes'] = state.pop('label_space_bytes')
    torch.save(checkpoint, tmp_path / 'legacy.pth')
    legacy = MODELS.build(copy.deepcopy(cfg.model))
    load_checkpoint(legacy, str(tmp_path / 'legacy.pth'), map_location='cpu')
    legacy.eval()
    assert legacy.label_space == model.label_space
    assert 'bbox_head.label_space_bytes' not in legacy.state_dict()
    legacy_preds, legacy_metrics = evaluate(legacy, full)
    assert legacy_preds.keys() == full_preds.keys()
    for key, (boxes, scores, class_names) in legacy_preds.items():
        assert torch.equal(boxes, full_preds[key][0]) and torch.equal(scores, full_preds[key][1])
        assert class_names == full_preds[key][2], key
    assert legacy_metrics == full_metrics
    strict = MODELS.build(copy.deepcopy(cfg.model))
    strict.load_state_dict(state)  # torch's strict load of the old layout
    assert strict.label_space == model.label_space


def test_unknown_dataset_or_class_is_an_error_naming_it(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    model = runner.model.eval()
    renamed = copy.deepcopy(cfg.test_dataloader.dataset)
    renamed.datasets = [d for d in renamed.datasets if d.name == 'signs']
    renamed.datasets[0].name = 'road-signs'
    with pytest.raises(KeyError, match=r"dataset 'road-signs' .*knows \['trees', 'aerial', "
                                       r"'signs'\]"):
        evaluate(model, renamed)
    more = copy.deepcopy(cfg.test_dataloader.dataset)
    more.datasets = [d for d in more.datasets if d.name == 'signs']
    more.datasets[0].dataset.metainfo = dict(classes=('stop', ))
    more.datasets[0].dataset.ignore_classes = ('yield', )
    evaluate(model, more)  # a subset of a dataset's classes is fine
    aerial = copy.deepcopy(cfg.test_dataloader.dataset)
    aerial.datasets = [d for d in aerial.datasets if d.name == 'aerial']
    aerial.datasets[0].dataset.metainfo = dict(classes=('plane', 'storage-tank', 'ship'))
    with pytest.raises(KeyError, match=r"class 'ship' of dataset 'aerial'"):
        evaluate(model, aerial)
