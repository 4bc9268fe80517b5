"""DINO head whose predictions can be restricted to the image's own dataset's classes."""
from torch import Tensor

from mmdet.models.dense_heads import DINOHead
from mmdet.registry import MODELS


@MODELS.register_module()
class DatasetAwareDINOHead(DINOHead):
    """DINOHead that, when an image's dataset is known, scores only that dataset's classes.

    The mixture puts each image's ``label_map`` (its classes' ids in the unified label
    space) into the sample's metainfo. With ``dataset_aware=True`` (default) the other
    classes' logits are set to -inf before the top-k, so every kept box is one of the
    dataset's classes; labels stay unified ids (the per-dataset metric maps them to the
    dataset's own ids). ``dataset_aware=False`` scores the whole unified space (the
    router-only setting: no dataset information at inference at all).
    """

    def __init__(self, *args, dataset_aware: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset_aware = dataset_aware

    def _predict_by_feat_single(self, cls_score: Tensor, bbox_pred: Tensor, img_meta: dict,
                                rescale: bool = True):
        label_map = img_meta.get('label_map')
        if self.dataset_aware and label_map is not None:
            outside = cls_score.new_ones(cls_score.shape[-1], dtype=bool)
            outside[list(label_map)] = False
            cls_score = cls_score.masked_fill(outside, float('-inf'))
        return super()._predict_by_feat_single(cls_score, bbox_pred, img_meta, rescale)
