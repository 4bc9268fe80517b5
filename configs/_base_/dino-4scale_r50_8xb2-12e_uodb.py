# DINO-4scale R50 on the Universal Object Detection Benchmark (UODB, Wang et al. 2019):
# the base of the paper's three rows (dense / vanilla MoE / DAMEX). 11 datasets with
# their own label spaces, mixed with damex's DatasetMixture. Data under data/uodb/.
# The expert map follows the official DAMEX code: 8 experts; VOC and Comic share
# COCO's expert, KITTI shares LISA's (both driving scenes).
# COCO is read from its JSON, DOTA from its txt files (split into 1024 patches with
# tools/dataset_converters/split_dota.py), the rest from VOC-style XML folders.
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
custom_imports = dict(imports=['damex'], allow_failed_imports=False)

data_root = 'data/uodb/'
backend_args = None

VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
ARTISTIC_CLASSES = ('bicycle', 'bird', 'car', 'cat', 'dog', 'person')
KITCHEN_CLASSES = ('advil_liqui_gels', 'aunt_jemima_original_syrup', 'bumblebee_albacore',
                   'cholula_chipotle_hot_sauce', 'coca_cola_glass_bottle', 'hunts_sauce',
                   'mahatma_rice', 'nature_valley_granola_thins_dark_chocolate',
                   'nutrigrain_harvest_blueberry_bliss', 'pringles_bbq', 'red_bull')

# mmdet's COCO class names (a COCO dataset in a mixture must name its classes)
COCO_CLASSES = ('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
                'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
                'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
                'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag',
                'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
                'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
                'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
                'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot',
                'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
                'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
                'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
                'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
                'hair drier', 'toothbrush')

# name, classes, expert (h(d)), format
UODB = [
    ('kitti', ('car', 'pedestrian', 'cyclist'), 5, 'xml'),
    ('widerface', ('face', ), 7, 'xml'),
    ('voc', VOC_CLASSES, 1, 'xml'),
    ('lisa', ('speedlimit', 'stop', 'warning', 'noturn'), 5, 'xml'),
    ('dota', None, 3, 'dota'),  # DOTA v1.0's 15 classes
    ('coco', COCO_CLASSES, 1, 'coco'),
    ('watercolor', ARTISTIC_CLASSES, 6, 'xml'),
    ('clipart', VOC_CLASSES, 0, 'xml'),
    ('comic', ARTISTIC_CLASSES, 1, 'xml'),
    ('kitchen', KITCHEN_CLASSES, 4, 'xml'),
    ('deeplesion', ('lesion', ), 2, 'xml'),
]


def _dataset(name, classes, fmt, split):
    root = data_root + name + '/'
    test_mode = split != 'train'
    if fmt == 'coco':
        return dict(type='CocoDataset', data_root=root, test_mode=test_mode,
                    ann_file=f'annotations/instances_{split}2017.json',
                    data_prefix=dict(img=f'{split}2017/'), metainfo=dict(classes=classes),
                    filter_cfg=dict(filter_empty_gt=False, min_size=32),
                    backend_args=backend_args)
    if fmt == 'dota':
        return dict(type='DOTADataset', data_root=root, test_mode=test_mode,
                    ann_file=f'{split}/labelTxt/', data_prefix=dict(img_path=f'{split}/images/'),
                    backend_args=backend_args)
    return dict(type='XMLDataset', data_root=root, test_mode=test_mode,
                ann_file=f'ImageSets/Main/{split}.txt', data_prefix=dict(sub_data_root=''),
                metainfo=dict(classes=classes),
                filter_cfg=dict(filter_empty_gt=False), backend_args=backend_args)


def uodb_mixture(split, pipeline):
    # `pipeline` applies to every dataset; mmdet's DetInferencer reads the test one here
    return dict(type='DatasetMixture', num_experts=8, pipeline=pipeline, datasets=[
        dict(name=name, expert=expert, dataset=_dataset(name, classes, fmt, split))
        for name, classes, expert, fmt in UODB])


# 3 + 1 + 20 + 4 + 15 + 80 + 6 + 20 + 6 + 11 + 1 = 167 classes (disjoint union; the
# official code's 178-way head adds one background class per dataset).
model = dict(
    type='DAMEXDINO',
    # no `moe`: every FFN stays dense (mmdet's DINO); the MoE rows add one
    bbox_head=dict(type='DatasetAwareDINOHead', num_classes=167))

train_dataloader = dict(
    sampler=dict(_delete_=True, type='MixtureSampler', policy='proportional'),
    dataset=dict(_delete_=True, **uodb_mixture('train', {{_base_.train_pipeline}})))
val_dataloader = dict(dataset=dict(_delete_=True, **uodb_mixture('val', {{_base_.test_pipeline}})))
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type='PerDatasetCocoMetric')
test_evaluator = val_evaluator
# Checkpoints that survive a kill at any instant (atomic writes, old ones removed last,
# resume from the newest complete one); mmdet's checkpoint arguments are unchanged.
default_hooks = dict(checkpoint=dict(type='CrashSafeCheckpointHook'))
# Exact resume (random states in checkpoints) and an expert-map check before training.
custom_hooks = [dict(type='RandomStateHook'), dict(type='ExpertMapCheckHook')]
# Data parallel: every parameter (experts included) gets a gradient in every step, even
# when an expert receives no token, so DDP needs no find_unused_parameters. Built through
# the wrapper config with device_ids=None (DDP then uses the module's device) so that the
# same config also runs on CPU with gloo.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                         find_unused_parameters=False)
