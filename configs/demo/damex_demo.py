# The demo: a CPU-sized DAMEX-DINO trained on the demo mixture (data/demo, made by
# tools/misc/make_demo_data.py): NEON tree tiles (real, VOC XML), rendered aerial shapes
# (DOTA txt) and rendered signs (COCO JSON): three datasets, three formats, three label
# spaces. dense_demo.py and moe_demo.py differ only in the FFNs.
# To train on other data, replace train_dataloader.dataset / test_dataloader.dataset with
# another DatasetMixture and set model.bbox_head.num_classes.
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'
custom_imports = dict(imports=['damex'], allow_failed_imports=False)

data_root = 'data/demo/'
image_size = 256
num_experts = 3

model = dict(
    type='DAMEXDINO',
    num_queries=60,
    backbone=dict(depth=18, frozen_stages=-1, init_cfg=None),
    neck=dict(in_channels=[128, 256, 512]),
    encoder=dict(num_layers=2, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=512))),
    decoder=dict(num_layers=6, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=512))),
    bbox_head=dict(type='DatasetAwareDINOHead', num_classes=5),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=30)),
    moe=dict(
        num_experts=num_experts,
        router=dict(type='DatasetAwareRouter', noise_std=1.0),
        decoder_layers=[0, 2, 4],
        aux_loss_weights=dict(damex=0.1)),
    test_cfg=dict(max_per_img=60))

# Pixels as stored (EXIF orientation ignored): annotations refer to the stored pixels.
train_pipeline = [
    dict(type='LoadImageFromFile', color_type='color_ignore_orientation'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', color_type='color_ignore_orientation'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def demo_mixture(split, pipeline):
    test_mode = split != 'train'
    # `pipeline` applies to every dataset; mmdet's DetInferencer reads the test one here
    return dict(type='DatasetMixture', num_experts=num_experts, pipeline=pipeline, datasets=[
        dict(name='trees', expert=0, dataset=dict(
            type='XMLFolderDataset', data_root=data_root + 'trees/', ann_file=split,
            data_prefix=dict(img_path=split), metainfo=dict(classes=('Tree', )),
            test_mode=test_mode)),
        dict(name='aerial', expert=1, dataset=dict(
            type='DOTADataset', data_root=data_root + 'aerial/', ann_file=f'{split}/labelTxt',
            data_prefix=dict(img_path=f'{split}/images'),
            metainfo=dict(classes=('plane', 'storage-tank')),
            test_mode=test_mode)),
        dict(name='signs', expert=2, dataset=dict(
            type='CocoDataset', data_root=data_root + 'signs/', ann_file=f'{split}.json',
            data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=('stop', 'yield')),
            filter_cfg=dict(filter_empty_gt=False), test_mode=test_mode)),
    ])


train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    # infinite: the iteration loop never restarts the dataloader (no warning, no pause)
    sampler=dict(_delete_=True, type='MixtureSampler', policy='uniform', infinite=True),
    batch_sampler=None,
    dataset=dict(_delete_=True, **demo_mixture('train', train_pipeline)))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **demo_mixture('val', test_pipeline)))
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type='PerDatasetCocoMetric')
test_evaluator = val_evaluator

# one log line per paramwise setting, not one per parameter
optim_wrapper = dict(constructor='QuietOptimWrapperConstructor', optimizer=dict(lr=2e-4),
                     paramwise_cfg=dict(custom_keys={}))
max_iters = 300
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
param_scheduler = [dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
                        milestones=[int(max_iters * 0.8)], gamma=0.1)]
default_hooks = dict(
    logger=dict(interval=10),
    # atomic writes, old checkpoints removed last, resume from the newest complete one
    checkpoint=dict(type='CrashSafeCheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False)
# Exact resume (random states in checkpoints) and an expert-map check before training.
custom_hooks = [dict(type='RandomStateHook'), dict(type='ExpertMapCheckHook')]
# Data parallel: every parameter (experts included) gets a gradient in every step, even
# when an expert receives no token, so DDP needs no find_unused_parameters. Built through
# the wrapper config with device_ids=None (DDP then uses the module's device) so that the
# same config also runs on CPU with gloo.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                         find_unused_parameters=False)
