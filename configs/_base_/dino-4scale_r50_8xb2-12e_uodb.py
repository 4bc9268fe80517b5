# DINO-4scale R50 on the Universal Object Detection Benchmark (UODB, Wang et al. 2019):
# the base of the paper's three rows (dense / vanilla MoE / DAMEX). 11 datasets with
# their own label spaces, mixed with damex's DatasetMixture. Data under data/uodb/.
# The expert map follows the official DAMEX code: 8 experts; VOC and Comic share
# COCO's expert, KITTI shares LISA's (both driving scenes).
# COCO is read from its JSON, DOTA from its txt files (split into 1024 patches with
# tools/dataset_converters/split_dota.py), the rest from VOC-layout XML: VOC, Watercolor,
# Clipart and Comic as distributed, KITTI, WIDER FACE, LISA, Kitchen and DeepLesion as
# written by tools/dataset_converters/uodb.py (README "Reproducing UODB").
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
custom_imports = dict(imports=['damex'], allow_failed_imports=False)

data_root = 'data/uodb/'
backend_args = None

VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
               'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
ARTISTIC_CLASSES = ('bicycle', 'bird', 'car', 'cat', 'dog', 'person')
# GMU Kitchen Scenes' 11 BigBIRD instances (UODB's list)
KITCHEN_CLASSES = ('coca_cola_glass_bottle', 'coffee_mate_french_vanilla',
                   'honey_bunches_of_oats_honey_roasted', 'hunts_sauce', 'mahatma_rice',
                   'nature_valley_soft_baked_oatmeal_squares_cinnamon_brown_sugar',
                   'nature_valley_sweet_and_salty_nut_almond', 'palmolive_orange',
                   'pop_secret_light_butter', 'pringles_bbq', 'red_bull')

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

# name, classes, expert (h(d)), format, image suffix. Formats: 'converted' = a tree written
# by tools/dataset_converters/uodb.py (0-based coordinates, read as stored); 'voc' = VOC
# XML as its owners distribute it (1-based: 1 is subtracted, as mmdet does).
UODB = [
    ('kitti', ('car', 'pedestrian', 'cyclist'), 5, 'converted', '.png'),
    ('widerface', ('face', ), 7, 'converted', '.jpg'),
    ('voc', VOC_CLASSES, 1, 'voc', '.jpg'),
    ('lisa', ('speedlimit', 'stop', 'warning', 'noturn'), 5, 'converted', '.png'),
    ('dota', None, 3, 'dota', None),  # DOTA v1.0's 15 classes
    ('coco', COCO_CLASSES, 1, 'coco', None),
    ('watercolor', ARTISTIC_CLASSES, 6, 'voc', '.jpg'),
    ('clipart', VOC_CLASSES, 0, 'voc', '.jpg'),
    ('comic', ARTISTIC_CLASSES, 1, 'voc', '.jpg'),
    ('kitchen', KITCHEN_CLASSES, 4, 'converted', '.png'),
    ('deeplesion', ('lesion', ), 2, 'converted', '.png'),
]


def _dataset(name, classes, fmt, split, img_suffix):
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
    return dict(type='UODBXMLDataset', data_root=root, test_mode=test_mode,
                ann_file=f'ImageSets/Main/{split}.txt', data_prefix=dict(sub_data_root=''),
                metainfo=dict(classes=classes), img_suffix=img_suffix,
                one_based=fmt == 'voc', filter_cfg=dict(filter_empty_gt=False),
                backend_args=backend_args)


def uodb_mixture(split, pipeline):
    # `pipeline` applies to every dataset; mmdet's DetInferencer reads the test one here
    return dict(type='DatasetMixture', num_experts=8, pipeline=pipeline, datasets=[
        dict(name=name, expert=expert, dataset=_dataset(name, classes, fmt, split, suffix))
        for name, classes, expert, fmt, suffix in UODB])


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
optim_wrapper = dict(constructor='QuietOptimWrapperConstructor')  # one log line per paramwise setting
