"""Bootstrap intervals of box AP over images, on hand cases."""
import pytest
from pycocotools.coco import COCO

from damex.evaluation.bootstrap import DatasetEvaluation, bootstrap_ap
from damex.evaluation.per_dataset_coco_metric import coco_box_ap

BOX = [10.0, 10.0, 20.0, 20.0]  # x, y, w, h


def evaluation(detected_images):
    """Images 1 and 2, one ground-truth box each; exact detections on ``detected_images``."""
    coco = COCO()
    coco.dataset = dict(
        images=[dict(id=1, width=64, height=64), dict(id=2, width=64, height=64)],
        annotations=[dict(id=i, image_id=i, category_id=0, bbox=BOX, area=400.0, iscrowd=0)
                     for i in (1, 2)],
        categories=[dict(id=0, name='thing')])
    coco.createIndex()
    detections = [dict(image_id=i, category_id=0, bbox=BOX, score=0.9) for i in detected_images]
    return DatasetEvaluation(coco, detections, [1, 2], [0])


def test_resampling_duplicates_an_image_with_its_boxes_and_detections():
    half = evaluation([1])
    assert half.resampled([0, 0]).box_ap() == pytest.approx(1.0)  # image 1 twice
    assert half.resampled([1, 1]).box_ap() == 0.0  # image 2 twice: nothing found
    both = half.resampled([0, 1])
    assert len(both.coco_gt.getAnnIds()) == 2 and len(both.detections) == 1
    assert both.box_ap() == pytest.approx(half.box_ap())


def test_interval_on_a_hand_case_and_seeds_pooled():
    half = evaluation([1])  # finds image 1's box only
    full_ap = coco_box_ap(half.coco_gt, half.detections, [1, 2], cat_ids=[0])['bbox_mAP']
    # replicates: {1,1} -> 1.0 (p 1/4), {2,2} -> 0.0 (1/4), one of each -> full_ap (1/2)
    out = bootstrap_ap([dict(a=half)], num_samples=200, level=0.9)
    assert out['a'][0] == pytest.approx(full_ap)
    assert out['a'][1:] == (0.0, pytest.approx(1.0))
    assert out['mean'] == out['a']
    # two seeds, the second perfect: a replicate averages them on the same images, so
    # {2,2} gives (0 + 1) / 2: the interval's low end is 0.5
    pooled = bootstrap_ap([dict(a=half), dict(a=evaluation([1, 2]))], num_samples=200)
    assert pooled['a'][0] == pytest.approx((full_ap + 1.0) / 2)
    assert pooled['a'][1:] == (pytest.approx(0.5), pytest.approx(1.0))


def test_a_perfect_dataset_has_a_point_interval_and_the_mean_takes_both():
    out = bootstrap_ap([dict(a=evaluation([1, 2]), b=evaluation([1]))], num_samples=100)
    assert out['a'] == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    assert out['mean'][0] == pytest.approx((1.0 + out['b'][0]) / 2)
    assert out['mean'][1] >= 0.5 and out['mean'][2] == pytest.approx(1.0)
