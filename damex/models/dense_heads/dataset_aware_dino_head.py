"""DINO head that scopes its classification loss to each image's dataset and scores each
image with the class tables its detector hands it."""
from typing import Optional, Sequence

import torch
from mmengine.structures import InstanceData
from torch import Tensor

from mmdet.models.dense_heads import DINOHead
from mmdet.models.losses import QualityFocalLoss
from mmdet.registry import MODELS
from ..losses import DatasetScopedLoss

LOSS_SCOPES = ('dataset', 'all')


@MODELS.register_module()
class DatasetAwareDINOHead(DINOHead):
    """DINOHead for a mixture of datasets with different label spaces.

    The head owns no label space: the detector (:class:`~damex.models.DAMEXDINO`) holds
    the trained one and writes every image's class tables into its metainfo before
    predicting: ``score_classes``, the trained ids of its dataset's classes, and
    ``output_labels``, trained id -> id in the test mixture's unified space (-1: the test
    mixture lacks that class). Training reads ``label_map`` (set by the mixture).

    Args:
        dataset_aware: True (default): when an image's class tables are known (always in
            evaluation), only its dataset's classes are scored. False: the whole trained
            unified space is scored (the router-only setting).
        loss_scope: 'dataset' (default): for every image the classification loss of the
            decoder layers, the encoder's proposals and the denoising queries counts only
            its own dataset's classes (a class merged across datasets counts for each),
            and the denoising label noise draws from them (the detector arranges that);
            other datasets' classes are neither positives nor negatives
            (:class:`~damex.models.losses.DatasetScopedLoss`). 'all': every class counts,
            the others as negatives (the official DAMEX code).

    Predictions leave the head in the ids of ``output_labels`` (a class mapped to -1 is
    dropped); without tables (e.g. no dataset known) labels are the trained ids.
    """

    def __init__(self, *args, dataset_aware: bool = True, loss_scope: str = 'dataset',
                 **kwargs):
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f'loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}')
        super().__init__(*args, **kwargs)
        if loss_scope == 'dataset':
            if isinstance(self.loss_cls, QualityFocalLoss):
                raise ValueError("loss_scope='dataset' supports sigmoid focal / BCE losses, "
                                 'not QualityFocalLoss')
            self.loss_cls = DatasetScopedLoss(self.loss_cls)
        self.dataset_aware = dataset_aware
        self.loss_scope = loss_scope

    # --- classification loss scoped to each image's dataset ---
    def _class_mask(self, batch_img_metas: Sequence[dict], num_queries: int) -> Optional[Tensor]:
        """(B * num_queries, C): 1 for the classes of each query's image's dataset."""
        label_maps = [meta.get('label_map') for meta in batch_img_metas]
        if self.loss_scope == 'all' or any(m is None for m in label_maps):
            return None
        mask = torch.zeros(len(label_maps), self.cls_out_channels,
                           device=self.cls_branches[0].weight.device)
        for row, label_map in zip(mask, label_maps):
            row[list(label_map)] = 1.0
        return mask.repeat_interleave(num_queries, 0)

    def loss_by_feat_single(self, cls_scores: Tensor, bbox_preds: Tensor, batch_gt_instances,
                            batch_img_metas):
        if self.loss_scope == 'all':
            return super().loss_by_feat_single(cls_scores, bbox_preds, batch_gt_instances,
                                               batch_img_metas)
        with self.loss_cls.scoped(self._class_mask(batch_img_metas, cls_scores.shape[1])):
            return super().loss_by_feat_single(cls_scores, bbox_preds, batch_gt_instances,
                                               batch_img_metas)

    def _loss_dn_single(self, dn_cls_scores: Tensor, dn_bbox_preds: Tensor, batch_gt_instances,
                        batch_img_metas, dn_meta):
        if self.loss_scope == 'all':
            return super()._loss_dn_single(dn_cls_scores, dn_bbox_preds, batch_gt_instances,
                                           batch_img_metas, dn_meta)
        with self.loss_cls.scoped(self._class_mask(batch_img_metas, dn_cls_scores.shape[1])):
            return super()._loss_dn_single(dn_cls_scores, dn_bbox_preds, batch_gt_instances,
                                           batch_img_metas, dn_meta)

    # --- prediction with the detector's class tables ---
    def _predict_by_feat_single(self, cls_score: Tensor, bbox_pred: Tensor, img_meta: dict,
                                rescale: bool = True) -> InstanceData:
        keep = img_meta.get('score_classes') if self.dataset_aware else None
        output = img_meta.get('output_labels')
        if keep is not None:
            outside = cls_score.new_ones(cls_score.shape[-1], dtype=torch.bool)
            outside[list(keep)] = False
            cls_score = cls_score.masked_fill(outside, float('-inf'))
        results = super()._predict_by_feat_single(cls_score, bbox_pred, img_meta, rescale)
        if keep is not None:  # top-k may fill up with zero-score entries of other classes
            results = results[~outside.to(results.labels.device)[results.labels]]
        if output is not None:
            labels = torch.as_tensor(output, device=results.labels.device)[results.labels]
            results = results[labels >= 0]
            results.labels = labels[labels >= 0]
        return results
