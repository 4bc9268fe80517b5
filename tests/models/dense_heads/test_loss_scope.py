"""loss_scope='dataset': an image's classification loss counts only its dataset's classes
(issue #11.3), checked against a direct computation; the denoising label noise too."""
import copy
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData

from mmdet.models.layers import CdnQueryGenerator
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from damex.datasets import LabelSpace
from damex.models.layers import DatasetScopedCdnQueryGenerator

from damex.testing import REPO

# A = (car, ship), B = (ship, plane), C = (tree,), merged by name: car 0, ship 1, plane 2, tree 3
SPACE = LabelSpace.build([('A', ('car', 'ship'), 0), ('B', ('ship', 'plane'), 1),
                          ('C', ('tree', ), 2)], merge=True)
QUERIES = 12


def build_head(num_classes, loss_scope):
    cfg = Config.fromfile(os.path.join(REPO, 'configs/demo/damex_demo.py'))
    head_cfg = copy.deepcopy(cfg.model.bbox_head)
    head_cfg.update(num_classes=num_classes, loss_scope=loss_scope,
                    train_cfg=cfg.model.train_cfg, test_cfg=cfg.model.test_cfg)
    return MODELS.build(head_cfg)


def image_of(dataset, own_labels):
    entry = SPACE.datasets[SPACE.index(dataset)]
    boxes = torch.tensor([[10., 10., 40., 50.], [60., 20., 90., 70.]])[:len(own_labels)]
    gt = InstanceData(bboxes=boxes, labels=torch.tensor([entry.label_map[i] for i in own_labels]))
    meta = dict(img_shape=(100, 100), label_map=list(entry.label_map))
    return gt, meta


def cls_loss_and_grad(head, cls_scores, bbox_preds, gts, metas):
    scores = cls_scores.clone().requires_grad_(True)
    loss_cls, _, _ = head.loss_by_feat_single(scores, bbox_preds, gts, metas)
    grad, = torch.autograd.grad(loss_cls, scores)
    return loss_cls.detach(), grad


@pytest.mark.parametrize('dataset, own_labels', [('A', [1, 0]), ('B', [0])])
def test_dataset_scoped_loss_equals_the_loss_over_the_dataset_classes_alone(dataset, own_labels):
    torch.manual_seed(0)
    cls_scores = torch.randn(1, QUERIES, SPACE.num_classes)
    bbox_preds = torch.rand(1, QUERIES, 4) * 0.5 + 0.25
    gt, meta = image_of(dataset, own_labels)
    scoped = build_head(SPACE.num_classes, 'dataset')
    loss, grad = cls_loss_and_grad(scoped, cls_scores, bbox_preds, [gt], [meta])
    own_ids = meta['label_map']
    outside = [c for c in range(SPACE.num_classes) if c not in own_ids]
    assert torch.all(grad[..., outside] == 0)  # exactly zero, ship's merged twin included

    # direct computation: a head that only knows the dataset's classes, labels in own ids
    alone = build_head(len(own_ids), 'all')
    own_gt = InstanceData(bboxes=gt.bboxes, labels=torch.tensor(own_labels))
    ref_loss, ref_grad = cls_loss_and_grad(alone, cls_scores[..., own_ids], bbox_preds,
                                           [own_gt], [dict(meta, label_map=None)])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad[..., own_ids], ref_grad)

    # 'all' (the official code) pushes every other class down: non-zero gradients there
    everything = build_head(SPACE.num_classes, 'all')
    _, grad_all = cls_loss_and_grad(everything, cls_scores, bbox_preds, [gt], [meta])
    assert grad_all[..., outside].abs().sum() > 0


def test_scope_is_per_image_in_a_mixed_batch_and_covers_denoising_queries():
    torch.manual_seed(1)
    head = build_head(SPACE.num_classes, 'dataset')
    (gt_a, meta_a), (gt_c, meta_c) = image_of('A', [0, 1]), image_of('C', [0])
    cls_scores = torch.randn(2, QUERIES, SPACE.num_classes)
    bbox_preds = torch.rand(2, QUERIES, 4) * 0.5 + 0.25
    _, grad = cls_loss_and_grad(head, cls_scores, bbox_preds, [gt_a, gt_c], [meta_a, meta_c])
    assert torch.all(grad[0][:, [2, 3]] == 0) and grad[0][:, [0, 1]].abs().sum() > 0
    assert torch.all(grad[1][:, [0, 1, 2]] == 0) and grad[1][:, 3].abs().sum() > 0
    # denoising queries: 2 groups of (positive, negative) per ground-truth box
    dn_meta = dict(num_denoising_queries=8, num_denoising_groups=2)
    scores = torch.randn(2, 8, SPACE.num_classes, requires_grad=True)
    loss_cls, _, _ = head._loss_dn_single(scores, torch.rand(2, 8, 4) * 0.5 + 0.25,
                                          [gt_a, gt_c], [meta_a, meta_c], dn_meta)
    grad, = torch.autograd.grad(loss_cls, scores)
    assert torch.all(grad[0][:, [2, 3]] == 0) and torch.all(grad[1][:, [0, 1, 2]] == 0)
    assert grad[0][:, [0, 1]].abs().sum() > 0 and grad[1][:, 3].abs().sum() > 0


def test_denoising_label_noise_stays_within_the_image_dataset():
    torch.manual_seed(0)
    generator = DatasetScopedCdnQueryGenerator(
        num_classes=SPACE.num_classes, embed_dims=SPACE.num_classes, num_matching_queries=10,
        label_noise_scale=1.0, box_noise_scale=1.0, group_cfg=dict(dynamic=False, num_groups=50))
    generator.label_embedding.weight.data = torch.eye(SPACE.num_classes)  # embedding = one-hot
    samples = []
    for dataset, own_labels in (('A', [0, 1]), ('C', [0])):
        gt, meta = image_of(dataset, own_labels)
        samples.append(DetDataSample(metainfo=meta, gt_instances=gt))
    label_query = generator(samples)[0]  # (B, dn queries, classes), padding rows all zero
    for queries, allowed in zip(label_query, ({0, 1}, {3})):
        used = queries[queries.abs().sum(-1) > 0].argmax(-1)
        assert set(used.unique().tolist()) == allowed  # noise drew only the image's classes
    # mmdet's generator draws from every class: the same call reaches the others
    plain = CdnQueryGenerator.__call__(generator, samples)[0]
    assert set(plain[0][plain[0].abs().sum(-1) > 0].argmax(-1).tolist()) - {0, 1}
