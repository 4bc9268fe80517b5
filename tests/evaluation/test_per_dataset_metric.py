"""PerDatasetCocoMetric against pycocotools, and the routing analysis against hand counts."""
import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from damex.datasets import LabelSpace
from damex.evaluation import PerDatasetCocoMetric

# dataset 'a': classes (cat, dog) -> unified 0, 1; dataset 'b': (car,) -> unified 2
SPACE = LabelSpace.build([('a', ('cat', 'dog'), 0), ('b', ('car', ), 1)])


def gt_image(dataset_id, img_id, boxes, labels, ignore=None):
    ignore = ignore or [0] * len(boxes)
    return dict(dataset_id=dataset_id, img_id=img_id, ori_shape=(100, 100),
                instances=[dict(bbox=b, bbox_label=l, ignore_flag=i)
                           for b, l, i in zip(boxes, labels, ignore)])


def with_predictions(image, boxes, scores, unified_labels):
    image = dict(image)
    image['pred_instances'] = dict(bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                   scores=torch.tensor(scores, dtype=torch.float32),
                                   labels=torch.tensor(unified_labels, dtype=torch.long))
    return image


def run_metric(samples, **kwargs):
    metric = PerDatasetCocoMetric(save_heatmaps=False, **kwargs)
    metric.dataset_meta = dict(classes=SPACE.classes, label_space=SPACE.to_dict())
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


A1 = gt_image(0, 1, [[10, 10, 50, 50], [60, 60, 90, 95]], [0, 1])
A2 = gt_image(0, 2, [[5, 5, 40, 30]], [1])
B1 = gt_image(1, 1, [[20, 20, 70, 80]], [0])  # same img_id as A1: ids are per dataset


def perfect(image, dataset_id):
    boxes = [inst['bbox'] for inst in image['instances']]
    labels = SPACE.to_unified(dataset_id, torch.tensor(
        [inst['bbox_label'] for inst in image['instances']])).tolist()
    return with_predictions(image, boxes, [1.0] * len(boxes), labels)


def test_perfect_predictions_give_ap_one_for_every_dataset():
    metrics = run_metric([perfect(A1, 0), perfect(A2, 0), perfect(B1, 1)])
    for name in ('a', 'b'):
        assert metrics[f'{name}/bbox_mAP'] == pytest.approx(1.0)
        assert metrics[f'{name}/bbox_mAP_50'] == pytest.approx(1.0)
    assert metrics['mean/bbox_mAP'] == pytest.approx(1.0)


def test_predictions_of_another_datasets_classes_do_not_leak():
    # on A's image, a perfect box labelled as B's 'car' (unified 2) is dropped for A ...
    leaky = with_predictions(A2, [[5, 5, 40, 30]], [1.0], [2])
    metrics = run_metric([perfect(A1, 0), leaky, perfect(B1, 1)])
    assert metrics['b/bbox_mAP'] == pytest.approx(1.0)  # ... and never reaches B
    assert metrics['a/bbox_mAP'] < 1.0


def test_dataset_without_predictions_reports_zero():
    empty = with_predictions(B1, [], [], [])
    metrics = run_metric([perfect(A1, 0), empty])
    assert metrics['b/bbox_mAP'] == 0.0 and metrics['b/bbox_mAP_l'] == 0.0
    assert metrics['mean/bbox_mAP'] == pytest.approx(0.5)


def cocoeval_stats(images, detections):
    """pycocotools run directly: images as (img_id, [(box, label, crowd)])."""
    coco = COCO()
    anns = [dict(id=k + 1, image_id=img_id, category_id=label, bbox=[b[0], b[1], b[2] - b[0],
                 b[3] - b[1]], area=(b[2] - b[0]) * (b[3] - b[1]), iscrowd=crowd)
            for k, (img_id, b, label, crowd) in enumerate(
                (i, b, l, c) for i, objs in images for b, l, c in objs)]
    coco.dataset = dict(images=[dict(id=i, width=100, height=100) for i, _ in images],
                        annotations=anns, categories=[dict(id=0), dict(id=1)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        dt = coco.loadRes(detections)
        ev = COCOeval(coco, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_values_match_cocoeval_with_ignored_and_crowd_boxes():
    rng = np.random.default_rng(0)
    a1 = gt_image(0, 1, [[10, 10, 50, 50], [60, 60, 90, 95], [5, 60, 30, 90]], [0, 1, 0],
                  ignore=[0, 0, 1])
    a2 = gt_image(0, 2, [[5, 5, 40, 30], [50, 10, 95, 45]], [1, 1])
    samples, detections = [], []
    for image in (a1, a2):
        boxes, scores, labels = [], [], []
        for inst in image['instances'] + [dict(bbox=[0, 0, 20, 20], bbox_label=0)]:
            box = (np.asarray(inst['bbox']) + rng.normal(0, 3, 4)).tolist()
            score = float(rng.uniform(0.3, 1.0))
            boxes.append(box)
            scores.append(score)
            labels.append(inst['bbox_label'])
            detections.append(dict(image_id=image['img_id'], category_id=inst['bbox_label'],
                                   bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                   score=score))
        samples.append(with_predictions(image, boxes, scores, labels))  # A's unified == own ids
    metrics = run_metric(samples + [perfect(B1, 1)])
    expected = cocoeval_stats(
        [(img['img_id'], [(i['bbox'], i['bbox_label'], i['ignore_flag'])
                          for i in img['instances']]) for img in (a1, a2)], detections)
    keys = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')
    for key, value in zip(keys, expected[:6]):
        assert metrics[f'a/{key}'] == pytest.approx(value, abs=1e-9), key


def test_routing_counts_and_accuracy_by_hand(tmp_path):
    # one MoE layer, 2 experts; dataset a -> expert 0, b -> expert 1
    counts_a1 = torch.tensor([[3, 1]])  # (layers, experts)
    counts_a2 = torch.tensor([[2, 2]])
    counts_b1 = torch.tensor([[1, 3]])
    samples = []
    for image, dataset_id, counts in ((A1, 0, counts_a1), (A2, 0, counts_a2), (B1, 1, counts_b1)):
        sample = perfect(image, dataset_id)
        sample.update(routing_counts=counts, routing_layers=('decoder.layers.0.ffn', ))
        samples.append(sample)
    metric = PerDatasetCocoMetric(heatmap_dir=str(tmp_path))
    metric.dataset_meta = dict(classes=SPACE.classes, label_space=SPACE.to_dict())
    metric.process({}, samples)
    metrics = metric.compute_metrics(metric.results)
    # a: 5 of its 8 tokens reach expert 0; b: 3 of 4 reach expert 1
    assert metrics['routing/a/accuracy'] == pytest.approx(5 / 8)
    assert metrics['routing/b/accuracy'] == pytest.approx(3 / 4)
    assert metrics['routing/decoder.layers.0.ffn/accuracy'] == pytest.approx((5 / 8 + 3 / 4) / 2)
    assert metrics['routing/accuracy'] == pytest.approx((5 / 8 + 3 / 4) / 2)
    [path] = metric.heatmap_files
    assert path.startswith(str(tmp_path)) and path.endswith('routing_decoder_layers_0_ffn.png')
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.size == (640, 480)


# --- issue #11.4: only real APs are averaged; ground truth clipped like predictions ---

def test_dataset_without_ground_truth_is_undefined_and_left_out_of_the_mean(caplog):
    empty_b = gt_image(1, 5, [], [])
    metrics = run_metric([perfect(A1, 0), perfect(A2, 0),
                          with_predictions(empty_b, [[1, 1, 9, 9]], [0.9], [2])])
    assert metrics['b/bbox_mAP'] == -1.0 and metrics['b/bbox_mAP_50'] == -1.0
    assert metrics['a/bbox_mAP'] == pytest.approx(1.0)
    assert metrics['mean/bbox_mAP'] == pytest.approx(1.0)  # not (1.0 + -1.0) / 2
    # no image of 'b' at all: undefined as well
    metrics = run_metric([perfect(A1, 0)])
    assert metrics['b/bbox_mAP'] == -1.0 and metrics['mean/bbox_mAP'] == pytest.approx(1.0)


def test_table_shows_na_for_undefined(capsys):
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('test_na', log_level='INFO')
    metric = PerDatasetCocoMetric(save_heatmaps=False)
    metric.dataset_meta = dict(classes=SPACE.classes, label_space=SPACE.to_dict())
    metric.process({}, [perfect(A1, 0)])
    messages = []
    handler_info = logger.info
    logger.info = lambda msg, *a, **k: messages.append(msg)
    try:
        metric.compute_metrics(metric.results)
    finally:
        logger.info = handler_info
    row_b = [line for line in messages[0].splitlines() if line.startswith('| b ')][0]
    assert 'n/a' in row_b and '-1' not in row_b


def test_ground_truth_past_the_border_is_clipped_like_predictions():
    # a box that extends 40 px past the right border; the detector's box is clipped to 100
    image = gt_image(0, 1, [[70, 10, 140, 50]], [0])
    pred = with_predictions(image, [[70, 10, 100, 50]], [1.0], [0])
    metrics = run_metric([pred])
    assert metrics['a/bbox_mAP_50'] == pytest.approx(1.0)  # IoU 30/70 < 0.5 unclipped


def test_ground_truth_wholly_outside_the_image_is_dropped_with_a_warning():
    image = gt_image(0, 1, [[10, 10, 50, 50], [120, 10, 150, 40]], [0, 1])
    pred = with_predictions(image, [[10, 10, 50, 50]], [1.0], [0])
    with pytest.warns(UserWarning, match=r"dataset 'a': dropped 1 ground-truth boxes"):
        metrics = run_metric([pred])
    assert metrics['a/bbox_mAP'] == pytest.approx(1.0)


def test_predictions_from_another_mixture_are_an_error():
    other = LabelSpace.build([('b', ('car', ), 0), ('a', ('cat', 'dog'), 1)])
    sample = dict(perfect(A1, 0), label_space=other.to_dict())
    with pytest.raises(ValueError, match='tagged by another mixture'):
        run_metric([sample])


def test_heatmaps_go_to_the_current_run_when_an_earlier_run_made_the_visualizer(tmp_path):
    # mmdet's configs name their visualizer 'visualizer', and mmengine hands a second Runner
    # of the same process (a notebook, a script training two configs) the first one's
    # instance, save dir included: the second run's heatmaps must still land in its own dir
    from mmengine.logging import MMLogger
    from mmengine.visualization import Visualizer
    first, second = tmp_path / 'first' / 'ts1', tmp_path / 'second' / 'ts2'
    Visualizer.get_instance('visualizer', vis_backends=[dict(type='LocalVisBackend')],
                            save_dir=str(first))
    Visualizer.get_instance('visualizer', save_dir=str(second))  # what the 2nd Runner gets
    second.mkdir(parents=True)
    MMLogger.get_instance('second_run', log_file=str(second / 'ts2.log'))
    sample = perfect(A1, 0)
    sample.update(routing_counts=torch.tensor([[3, 1]]), routing_layers=('decoder.layers.0.ffn', ))
    metric = PerDatasetCocoMetric()
    metric.dataset_meta = dict(classes=SPACE.classes, label_space=SPACE.to_dict())
    metric.process({}, [sample])
    metric.compute_metrics(metric.results)
    [path] = metric.heatmap_files
    assert path == str(second / 'vis_data' / 'routing' / 'routing_decoder_layers_0_ffn.png')
    assert not (first / 'vis_data').exists()
