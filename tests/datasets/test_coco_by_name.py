"""COCO datasets in a mixture map categories by name, in metainfo.classes order (issue #11.2),
and bad COCO JSON files fail with the file named (issue #13)."""
import json

import pytest
import torch

from damex.datasets import DatasetMixture, LabelSpace
from damex.evaluation import PerDatasetCocoMetric

# the JSON lists 'stop' first (id 7), then 'yield' (id 3), then an unused 'bike' (id 9)
CATEGORIES = [dict(id=7, name='stop'), dict(id=3, name='yield'), dict(id=9, name='bike')]
IMAGES = [dict(id=1, file_name='a.png', width=100, height=80),
          dict(id=2, file_name='b.png', width=100, height=80)]
ANNOTATIONS = [
    dict(id=1, image_id=1, category_id=7, bbox=[10, 10, 20, 20], area=400, iscrowd=0),
    dict(id=2, image_id=1, category_id=3, bbox=[50, 30, 30, 30], area=900, iscrowd=0),
    dict(id=3, image_id=2, category_id=3, bbox=[5, 5, 40, 40], area=1600, iscrowd=0),
]


def write_json(path, **overrides):
    data = dict(images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES)
    data.update(overrides)
    path.write_text(json.dumps(data))
    return str(path)


def coco_mixture(ann_file, test_mode=True, **dataset_kwargs):
    dataset = dict(type='CocoDataset', ann_file=ann_file, data_prefix=dict(img=''),
                   test_mode=test_mode, pipeline=[], lazy_init=False, **dataset_kwargs)
    return DatasetMixture(datasets=[dict(name='signs', dataset=dataset)])


def labels_by_category(mixture):
    """{JSON category id: label} over every loaded box."""
    coco = json.load(open(mixture.datasets[0].ann_file))
    boxes = {(a['image_id'], tuple(a['bbox'])): a['category_id'] for a in coco['annotations']}
    found = {}
    dataset = mixture.datasets[0]
    for info in (dataset.get_data_info(i) for i in range(len(dataset))):
        for inst in info['instances']:
            x1, y1, x2, y2 = inst['bbox']
            found[boxes[(info['img_id'], (x1, y1, x2 - x1, y2 - y1))]] = inst['bbox_label']
    return found


def test_labels_follow_classes_order_not_json_order(tmp_path):
    ann = write_json(tmp_path / 'a.json')
    mixture = coco_mixture(ann, metainfo=dict(classes=('yield', 'stop')))
    assert labels_by_category(mixture) == {3: 0, 7: 1}  # yield -> 0, stop -> 1


def test_perfect_predictions_score_ap_one_with_reordered_classes(tmp_path):
    """Loading and evaluation agree: today's code scores 0.0 here."""
    ann = write_json(tmp_path / 'a.json')
    mixture = coco_mixture(ann, metainfo=dict(classes=('yield', 'stop')))
    space = LabelSpace.from_metainfo(mixture.metainfo)
    samples = []
    dataset = mixture.datasets[0]
    for info in (dataset.get_data_info(i) for i in range(len(dataset))):
        boxes = [inst['bbox'] for inst in info['instances']]
        labels = space.to_unified(0, torch.tensor([i['bbox_label'] for i in info['instances']]))
        samples.append(dict(dataset_id=0, img_id=info['img_id'], ori_shape=(80, 100),
                            instances=None, pred_instances=dict(
                                bboxes=torch.tensor(boxes, dtype=torch.float32),
                                scores=torch.ones(len(boxes)), labels=labels)))
    metric = PerDatasetCocoMetric(save_heatmaps=False)
    metric.dataset_meta = mixture.metainfo
    metric.process({}, samples)
    metrics = metric.compute_metrics(metric.results)
    assert metrics['signs/bbox_mAP'] == pytest.approx(1.0)


def test_ignored_json_category_is_not_scored(tmp_path):
    """A category with annotations left out on purpose is dropped in loading and not scored
    in evaluation (today: dropped in training, scored as missed in evaluation, AP 0.667)."""
    ann = write_json(tmp_path / 'a.json')
    with pytest.raises(ValueError, match=r"a\.json.*\['yield'\] have annotations but are not in"):
        coco_mixture(ann, metainfo=dict(classes=('stop', )))
    mixture = coco_mixture(ann, metainfo=dict(classes=('stop', )), ignore_classes=('yield', ))
    assert labels_by_category(mixture) == {7: 0}
    dataset = mixture.datasets[0]
    info = [dataset.get_data_info(i) for i in range(len(dataset))
            if dataset.get_data_info(i)['instances']][0]
    metric = PerDatasetCocoMetric(save_heatmaps=False)
    metric.dataset_meta = mixture.metainfo
    metric.process({}, [dict(dataset_id=0, img_id=info['img_id'], ori_shape=(80, 100),
                             pred_instances=dict(bboxes=torch.tensor([info['instances'][0]['bbox']]),
                                                 scores=torch.ones(1),
                                                 labels=torch.zeros(1, dtype=torch.long))),
                        dict(dataset_id=0, img_id=2, ori_shape=(80, 100),
                             pred_instances=dict(bboxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                                 labels=torch.zeros(0, dtype=torch.long)))])
    assert metric.compute_metrics(metric.results)['signs/bbox_mAP'] == pytest.approx(1.0)


@pytest.mark.parametrize('classes, message', [
    (('Stop', 'yield'), r"classes \['Stop'\] are not categories of the JSON"),
    (None, r'set metainfo=dict\(classes='),
])
def test_class_names_must_match_the_json(tmp_path, classes, message):
    ann = write_json(tmp_path / 'a.json')
    kwargs = {} if classes is None else dict(metainfo=dict(classes=classes))
    with pytest.raises(ValueError, match=message) as error:
        coco_mixture(ann, **kwargs)
    assert 'a.json' in str(error.value)


def test_duplicate_category_names_are_an_error(tmp_path):
    ann = write_json(tmp_path / 'a.json', categories=CATEGORIES + [dict(id=11, name='stop')])
    with pytest.raises(ValueError, match=r"a\.json: category names \['stop'\] occur more than once"):
        coco_mixture(ann, metainfo=dict(classes=('stop', 'yield')))


def test_bom_is_accepted_and_bad_files_name_file_and_key(tmp_path):
    good = tmp_path / 'bom.json'
    good.write_bytes(b'\xef\xbb\xbf' + json.dumps(dict(
        images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES)).encode())
    mixture = coco_mixture(str(good), metainfo=dict(classes=('stop', 'yield', 'bike')))
    assert len(mixture) == 2
    cases = {'empty.json': ('', 'is empty'), 'obj.json': ('{}', "no 'images', 'annotations', "
                                                          "'categories' key"),
             'noann.json': (json.dumps(dict(images=IMAGES, categories=CATEGORIES)),
                            "no 'annotations' key"),
             'bad.json': ('{"images": [', 'not valid JSON')}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            coco_mixture(str(path), metainfo=dict(classes=('stop', )))
        assert name in str(error.value)


def test_annotation_without_area_is_an_error_naming_the_file(tmp_path):
    anns = [dict(a) for a in ANNOTATIONS]
    del anns[1]['area']
    ann = write_json(tmp_path / 'noarea.json', annotations=anns)
    with pytest.raises(ValueError, match=r"noarea\.json: annotation 2 has no 'area'"):
        coco_mixture(ann, metainfo=dict(classes=('stop', 'yield')))


def test_degenerate_and_outside_boxes_are_dropped_with_one_counted_warning(tmp_path):
    anns = ANNOTATIONS + [
        dict(id=4, image_id=1, category_id=7, bbox=[10, 10, 0, 20], area=0, iscrowd=0),
        dict(id=5, image_id=1, category_id=7, bbox=[10, 10, -5, 20], area=100, iscrowd=0),
        dict(id=6, image_id=2, category_id=3, bbox=[150, 10, 20, 20], area=400, iscrowd=0)]
    ann = write_json(tmp_path / 'odd.json', annotations=anns)
    with pytest.warns(UserWarning, match=r'odd\.json: skipped 3 objects: 2 boxes of zero or '
                                         r'negative size .*1 boxes wholly outside the image'):
        mixture = coco_mixture(ann, metainfo=dict(classes=('stop', 'yield')))
    dataset = mixture.datasets[0]
    assert sum(len(dataset.get_data_info(i)['instances']) for i in range(len(dataset))) == 3


def test_no_image_left_after_filtering_names_the_dataset(tmp_path):
    ann = write_json(tmp_path / 'a.json', annotations=[])
    with pytest.raises(ValueError, match=r"dataset 'signs': .*a\.json: no image left"):
        coco_mixture(ann, test_mode=False, metainfo=dict(classes=('stop', 'yield')),
                     filter_cfg=dict(filter_empty_gt=True))


def test_one_file_name_under_two_image_ids_is_an_error(tmp_path):
    images = [dict(IMAGES[0]), dict(IMAGES[1])]
    images[1]['file_name'] = images[0]['file_name']
    ann = write_json(tmp_path / 'a.json', images=images)
    with pytest.raises(ValueError, match=rf"a\.json: image '{images[0]['file_name']}' is listed "
                                         rf"under two image ids, {images[0]['id']} and "
                                         rf"{images[1]['id']}"):
        coco_mixture(ann, metainfo=dict(classes=('stop', 'yield')))
