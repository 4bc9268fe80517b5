"""DINO head that carries its training label space, scopes its classification loss to each
image's dataset, and predicts in the label space of whatever mixture it is tested on."""
import contextlib
import json
import warnings
from typing import Dict, Optional, Tuple

import torch
from mmengine.structures import InstanceData
from torch import Tensor, nn

from mmdet.models.dense_heads import DINOHead
from mmdet.models.losses import QualityFocalLoss
from mmdet.registry import MODELS
from ...datasets.label_space import LabelSpace

LOSS_SCOPES = ('dataset', 'all')
#: bytes reserved for the label space's JSON (thousands of classes fit)
LABEL_SPACE_CAPACITY = 1 << 18


def encode_label_space(space: Optional[LabelSpace], like: Tensor) -> Tensor:
    """The label space as zero-padded UTF-8 JSON bytes, shaped and placed like ``like``."""
    out = torch.zeros_like(like)
    if space is None:
        return out
    data = json.dumps(space.to_dict(), separators=(',', ':')).encode('utf-8')
    if len(data) > out.numel():
        raise ValueError(f'the label space needs {len(data)} bytes, more than the '
                         f'{out.numel()} the head reserves (LABEL_SPACE_CAPACITY)')
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(out.device)
    return out


def decode_label_space(data: Tensor) -> Optional[LabelSpace]:
    raw = bytes(data.cpu().numpy().tobytes()).rstrip(b'\x00')
    return LabelSpace.from_dict(json.loads(raw.decode('utf-8'))) if raw else None


class _ClassMaskedLoss(nn.Module):
    """The head's classification loss with per-(query, class) weights ``mask`` (N, C)."""

    def __init__(self, loss: nn.Module, mask: Tensor):
        super().__init__()
        self.loss = loss
        self.mask = mask

    def forward(self, pred, target, weight=None, avg_factor=None, **kwargs):
        mask = self.mask.to(pred.dtype)
        weight = mask if weight is None else weight.reshape(-1, 1).to(pred.dtype) * mask
        return self.loss(pred, target, weight, avg_factor=avg_factor, **kwargs)


@MODELS.register_module()
class DatasetAwareDINOHead(DINOHead):
    """DINOHead for a mixture of datasets with different label spaces.

    The label space: the head stores the label space of its training mixture
    (:attr:`label_space`, taken from the training batches and saved in checkpoints in the
    buffer ``label_space_bytes``). At test time each image's dataset is matched to it by name
    (classes by name within the dataset), so a test mixture may hold any subset of the
    training datasets in any order; a dataset or class the model was not trained on is an
    error naming it.

    Args:
        dataset_aware: True (default): when an image's dataset is known (always in
            evaluation), only that dataset's classes are scored. False: the whole trained
            unified space is scored (the router-only setting).
        loss_scope: 'dataset' (default): for every image the classification loss of the
            decoder layers, the encoder's proposals and the denoising queries counts only
            its own dataset's classes (a class merged across datasets counts for each),
            and the denoising label noise draws from them (the detector arranges that);
            other datasets' classes are neither positives nor negatives. 'all': every
            class counts, the others as negatives (the official DAMEX code).

    Predictions leave the head in the test mixture's unified ids (each image's
    ``label_space`` metainfo, set by the mixture); a class that mixture lacks is dropped.
    Without a mixture (e.g. mmdet's ``DetInferencer``) labels are the trained ids.
    """

    def __init__(self, *args, dataset_aware: bool = True, loss_scope: str = 'dataset',
                 **kwargs):
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f'loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}')
        super().__init__(*args, **kwargs)
        if loss_scope == 'dataset' and isinstance(self.loss_cls, QualityFocalLoss):
            raise ValueError("loss_scope='dataset' supports sigmoid focal / BCE losses, not "
                             'QualityFocalLoss')
        self.dataset_aware = dataset_aware
        self.loss_scope = loss_scope
        self.label_space: Optional[LabelSpace] = None
        # The label space as UTF-8 JSON, zero-padded, in a fixed-size buffer: it travels in
        # every state dict and checkpoint, and mmengine's weight broadcast and EMA, which
        # expect tensors of fixed shapes, handle it like any buffer.
        self.register_buffer('label_space_bytes',
                             torch.zeros(LABEL_SPACE_CAPACITY, dtype=torch.uint8))
        self._label_space_source: Optional[dict] = None
        self._loaded_without_label_space = False
        self._prediction_cache: Dict[tuple, Tuple[Optional[list], Optional[Tensor]]] = {}

    # --- the trained label space: set in training, saved and restored with the weights ---
    def adopt_label_space(self, space_dict: dict) -> None:
        """Make the training mixture's label space (plain data) the head's own."""
        if space_dict is self._label_space_source:
            return
        space = LabelSpace.from_dict(space_dict)
        check_num_classes(self.num_classes, space, 'the training mixture')
        if space != self.label_space:
            self.label_space_bytes.copy_(encode_label_space(space, self.label_space_bytes))
            self.label_space = space
            self._prediction_cache.clear()
        self._label_space_source = space_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'label_space_bytes'
        if key in state_dict:
            space = decode_label_space(state_dict[key])
            state_dict[key] = encode_label_space(space, self.label_space_bytes)
        else:
            space = None
        self.label_space, self._label_space_source = space, None
        self._loaded_without_label_space = space is None
        self._prediction_cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- classification loss scoped to each image's dataset ---
    @contextlib.contextmanager
    def _scoped_cls_loss(self, batch_img_metas, num_queries: int):
        label_maps = [meta.get('label_map') for meta in batch_img_metas]
        if self.loss_scope == 'all' or any(m is None for m in label_maps):
            yield
            return
        mask = torch.zeros(len(label_maps), self.cls_out_channels,
                           device=self.cls_branches[0].weight.device)
        for row, label_map in zip(mask, label_maps):
            row[list(label_map)] = 1.0
        loss = self._modules['loss_cls']
        self._modules['loss_cls'] = _ClassMaskedLoss(loss, mask.repeat_interleave(num_queries, 0))
        try:
            yield
        finally:
            self._modules['loss_cls'] = loss

    def loss_by_feat_single(self, cls_scores: Tensor, bbox_preds: Tensor, batch_gt_instances,
                            batch_img_metas):
        with self._scoped_cls_loss(batch_img_metas, cls_scores.shape[1]):
            return super().loss_by_feat_single(cls_scores, bbox_preds, batch_gt_instances,
                                               batch_img_metas)

    def _loss_dn_single(self, dn_cls_scores: Tensor, dn_bbox_preds: Tensor, batch_gt_instances,
                        batch_img_metas, dn_meta):
        with self._scoped_cls_loss(batch_img_metas, dn_cls_scores.shape[1]):
            return super()._loss_dn_single(dn_cls_scores, dn_bbox_preds, batch_gt_instances,
                                           batch_img_metas, dn_meta)

    # --- prediction in the test mixture's label space ---
    def trained_label_space(self, test_space: Optional[LabelSpace]) -> LabelSpace:
        """The label space the head's logits are in."""
        if self.label_space is not None:
            return self.label_space
        if self._loaded_without_label_space:
            raise RuntimeError(
                'the loaded checkpoint carries no label space (bbox_head.label_space_bytes), so its '
                'class ids cannot be matched to the test mixture\'s; re-save it from a damex '
                'training run, or train it with the mixture it is tested on')
        if test_space is None:
            raise RuntimeError('the model has no label space: train it on a DatasetMixture '
                               'or load a checkpoint of one')
        warnings.warn('DatasetAwareDINOHead: an untrained model (no trained label space) is '
                      'evaluated; its class ids are taken to be the test mixture\'s')
        return test_space

    def prediction_classes(self, img_meta: dict) -> Tuple[Optional[list], Optional[Tensor]]:
        """(trained ids to score or None for all, trained id -> output id table or None)."""
        name = img_meta.get('dataset_name')
        space_dict = img_meta.get('label_space')
        if name is None:
            return None, None
        key = (name, self.dataset_aware, repr(space_dict))
        if key not in self._prediction_cache:
            if len(self._prediction_cache) > 256:
                self._prediction_cache.clear()
            test = None if space_dict is None else LabelSpace.from_dict(space_dict)
            trained = self.trained_label_space(test)
            if test is not None:
                test.check_subset_of(trained)
                check_num_classes(self.num_classes, trained, 'the model\'s label space')
            if name not in trained.names:
                raise KeyError(f'dataset {name!r} was not in the model\'s training mixture; '
                               f'the model knows {list(trained.names)}')
            entry = trained.datasets[trained.index(name)]
            if test is not None:  # score the test dataset's classes (a subset, by name)
                own = test.datasets[test.index(name)].classes
                keep = [entry.label_map[entry.classes.index(c)] for c in own]
                table = torch.tensor(trained.id_map(test, prefer=name))
            else:
                keep, table = list(entry.label_map), None
            self._prediction_cache[key] = (keep if self.dataset_aware else None, table)
        return self._prediction_cache[key]

    def _predict_by_feat_single(self, cls_score: Tensor, bbox_pred: Tensor, img_meta: dict,
                                rescale: bool = True) -> InstanceData:
        keep, table = self.prediction_classes(img_meta)
        if keep is not None:
            outside = cls_score.new_ones(cls_score.shape[-1], dtype=torch.bool)
            outside[keep] = False
            cls_score = cls_score.masked_fill(outside, float('-inf'))
        results = super()._predict_by_feat_single(cls_score, bbox_pred, img_meta, rescale)
        if keep is not None:  # top-k may fill up with zero-score entries of other classes
            allowed = torch.zeros(cls_score.shape[-1], dtype=torch.bool,
                                  device=results.labels.device)
            allowed[keep] = True
            results = results[allowed[results.labels]]
        if table is not None:
            labels = table.to(results.labels.device)[results.labels]
            results = results[labels >= 0]
            results.labels = labels[labels >= 0]
        return results


def check_num_classes(num_classes: int, space: LabelSpace, what: str) -> None:
    if num_classes != space.num_classes:
        raise ValueError(
            f'model.bbox_head.num_classes is {num_classes}, but {what} has '
            f'{space.num_classes} unified classes ({", ".join(space.names)}); set '
            f'model.bbox_head.num_classes={space.num_classes}')
